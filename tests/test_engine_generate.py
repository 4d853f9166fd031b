"""Generation on a tiny pipeline: seeds, safety injection, clip skip, hires fix, progress and cancellation."""

from __future__ import annotations

import threading

import pytest
from engine_support import differ, one_torch_thread

from genserve.engine.generate import ModelInfo, generate
from genserve.engine.infotext import parse_hash_list, read_png_infotext
from genserve.generation.worker.wire import HiresSpec, WorkerRequest

MODEL = ModelInfo(name="tiny-sd1", model_hash="0123456789", lora_hashes={"style": "abcdefabcdef"})


@pytest.fixture(params=["sd1", "sdxl"])
def tiny(request, pipes):
    return pipes(request.param)


@pytest.fixture
def sd1(pipes):
    return pipes("sd1")


def _request(**kw) -> WorkerRequest:
    base = dict(job_id="job-1", checkpoint_id="tiny", prompt="a photo of a cat", negative_prompt="blurry",
                sampler="Euler a", steps=2, width=64, height=64, seeds=[7])
    return WorkerRequest(**{**base, **kw})


def _run(pipe, safety, request, **kw):
    with one_torch_thread():
        return generate(pipe, request, safety=safety, model=MODEL, **kw)


def test_seed_reproduces_and_each_batch_image_stands_alone(tiny):
    pipe, safety = tiny
    batch = _run(pipe, safety, _request(seeds=[7, 8]))
    alone = _run(pipe, safety, _request(seeds=[8]))
    again = _run(pipe, safety, _request(seeds=[7]))
    assert [img.seed for img in batch.images] == [7, 8] and not batch.canceled
    assert batch.images[0].image.tobytes() == again.images[0].image.tobytes()
    assert batch.images[1].image.tobytes() == alone.images[0].image.tobytes()
    assert differ(batch.images[0].image, batch.images[1].image) > 1.0


def test_safety_tokens_always_lead_the_negative_prompt(sd1):
    pipe, safety = sd1
    sneaky = _request(
        prompt="a cat <gs-safe-neg> (<GS-SAFE-MINOR>:1.5)",
        negative_prompt="(<gs-safe-neg>:0), [<gs-safe-minor>], blurry, <gs‐safe‐neg>_1",
        mature=True,
    )
    out = _run(pipe, safety, sneaky)
    assert out.final_negative_prompt == "<gs-safe-neg> <gs-safe-minor>, blurry"
    assert "gs-safe" not in out.final_prompt.lower() and "cat" in out.final_prompt
    info = read_png_infotext(out.images[0].encode())
    assert info.negative_prompt == out.final_negative_prompt and info.prompt == out.final_prompt
    # not mature: only the general token, still first; an empty user negative adds nothing after it
    plain = _run(pipe, safety, _request(negative_prompt="", mature=False))
    assert plain.final_negative_prompt == "<gs-safe-neg>"
    # the embedding really acts: the same request without it in the negative prompt gives another image
    class NoInjection:
        def inject(self, negative_prompt, prompt, mature):
            return prompt, negative_prompt

    with one_torch_thread():
        bare = generate(pipe, _request(negative_prompt=""), safety=NoInjection(), model=MODEL)
    assert differ(bare.images[0].image, plain.images[0].image) > 0.5


def test_infotext_records_the_image(sd1):
    pipe, safety = sd1
    out = _run(pipe, safety, _request(seeds=[11, 12], clip_skip=2, cfg_scale=6.5))
    info = read_png_infotext(out.images[1].encode())
    assert info.params["Seed"] == "12" and info.params["Steps"] == "2" and info.params["Sampler"] == "Euler a"
    assert info.params["CFG scale"] == "6.5" and info.params["Clip skip"] == "2" and info.params["Size"] == "64x64"
    assert info.params["Model hash"] == "0123456789" and info.params["Model"] == "tiny-sd1"
    assert parse_hash_list(info.params["Lora hashes"]) == {"style": "abcdefabcdef"}


def test_clip_skip_changes_the_conditioning(sd1):
    pipe, safety = sd1
    one = _run(pipe, safety, _request(clip_skip=1))
    two = _run(pipe, safety, _request(clip_skip=2))
    assert differ(one.images[0].image, two.images[0].image) > 0.5


@pytest.mark.parametrize(("family", "upscaler"), [("sd1", "latent"), ("sd1", "lanczos"), ("sdxl", "latent")])
def test_hires_fix_upscales_with_a_second_pass(pipes, family, upscaler):
    pipe, safety = pipes(family)
    events = []
    request = _request(steps=2, hires=HiresSpec(scale=1.5, denoise=0.5, steps=2, upscaler=upscaler))
    out = _run(pipe, safety, request, on_progress=lambda *e: events.append(e))
    assert out.images[0].image.size == (96, 96)
    assert [s for _, s, _ in events] == [1, 2, 3, 4] and events[-1] == (0, 4, 4)
    info = read_png_infotext(out.images[0].encode())
    assert info.params["Hires upscale"] == "1.5" and info.params["Hires steps"] == "2"
    assert info.params["Denoising strength"] == "0.5" and info.params["Size"] == "64x64"
    again = _run(pipe, safety, request)
    assert out.images[0].image.tobytes() == again.images[0].image.tobytes()


def test_hires_without_denoise_only_upscales(sd1):
    pipe, safety = sd1
    out = _run(pipe, safety, _request(hires=HiresSpec(scale=1.5, denoise=0.0)))
    assert out.images[0].image.size == (96, 96)


def test_progress_reports_every_step_of_every_image(sd1):
    pipe, safety = sd1
    events = []
    _run(pipe, safety, _request(seeds=[1, 2], steps=3), on_progress=lambda *e: events.append(e))
    assert events == [(0, 1, 3), (0, 2, 3), (0, 3, 3), (1, 1, 3), (1, 2, 3), (1, 3, 3)]


def test_cancel_stops_within_a_step_and_keeps_finished_images(sd1):
    pipe, safety = sd1
    cancel = threading.Event()
    events = []

    def progress(index, step, total):
        events.append((index, step))
        if (index, step) == (1, 2):
            cancel.set()

    out = _run(pipe, safety, _request(seeds=[1, 2, 3], steps=6), on_progress=progress, cancel=cancel)
    assert out.canceled and [img.index for img in out.images] == [0]
    assert events[-1] == (1, 2)  # no step ran after the one that saw the cancel
    # a cancel before the start generates nothing; the next request on the pipeline runs normally
    cancel_first = threading.Event()
    cancel_first.set()
    assert _run(pipe, safety, _request(), cancel=cancel_first).images == []
    assert len(_run(pipe, safety, _request()).images) == 1


def test_pipeline_views_are_built_once_and_a_hires_request_leaves_txt2img_unchanged(sd1):
    from diffusers import StableDiffusionImg2ImgPipeline

    from genserve.engine.views import drop_pipeline_views, pipeline_view

    pipe, safety = sd1
    before = _run(pipe, safety, _request(seeds=[5]))
    view = pipeline_view(pipe, type(pipe))
    assert view is not pipe and view.unet is pipe.unet  # shares the modules, copies no weights
    _run(pipe, safety, _request(seeds=[5], hires=HiresSpec(scale=1.5, denoise=0.5, steps=2)))
    img2img = pipeline_view(pipe, StableDiffusionImg2ImgPipeline)
    assert pipeline_view(pipe, type(pipe)) is view and img2img.vae is pipe.vae
    after = _run(pipe, safety, _request(seeds=[5]))
    assert after.images[0].image.tobytes() == before.images[0].image.tobytes()
    drop_pipeline_views(pipe)
    assert pipeline_view(pipe, type(pipe)) is not view


def test_a1111_syntax_reaches_the_image(sd1):
    pipe, safety = sd1
    plain = _run(pipe, safety, _request(prompt="a photo of a cat"))
    same = _run(pipe, safety, _request(prompt="(a photo of a cat:1.0) <lora:style:0.5>"))
    weighted = _run(pipe, safety, _request(prompt="a photo of a (cat:1.6)"))
    assert plain.images[0].image.tobytes() == same.images[0].image.tobytes()  # tags and weight 1 change nothing
    assert differ(plain.images[0].image, weighted.images[0].image) > 0.1
    # the infotext keeps what the user wrote, tags included
    assert read_png_infotext(same.images[0].encode()).prompt == "(a photo of a cat:1.0) <lora:style:0.5>"


def test_a_long_prompt_and_its_end_matter(sd1):
    pipe, safety = sd1
    words = " ".join(["red fox snow tree"] * 40)
    a = _run(pipe, safety, _request(prompt=words + " cat"))
    b = _run(pipe, safety, _request(prompt=words + " dog"))
    assert differ(a.images[0].image, b.images[0].image) > 0.1  # past 77 tokens, still conditioned on


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_editing_switches_mid_run(pipes, family):
    pipe, safety = pipes(family)
    cat = _run(pipe, safety, _request(prompt="a photo of a cat", steps=3))
    dog = _run(pipe, safety, _request(prompt="a photo of a dog", steps=3))
    edit = _run(pipe, safety, _request(prompt="a photo of a [cat:dog:1]", steps=3))
    again = _run(pipe, safety, _request(prompt="a photo of a [cat:dog:1]", steps=3))
    alternate = _run(pipe, safety, _request(prompt="a photo of a [cat|dog]", steps=3))
    assert edit.images[0].image.tobytes() == again.images[0].image.tobytes()
    for other in (cat, dog, alternate):  # the tiny model's later steps move few pixels: compare exactly
        assert edit.images[0].image.tobytes() != other.images[0].image.tobytes()
    assert alternate.images[0].image.tobytes() not in (cat.images[0].image.tobytes(), dog.images[0].image.tobytes())


def test_negative_syntax_cannot_touch_the_safety_tokens(sd1):
    pipe, safety = sd1
    hostile = _run(pipe, safety, _request(negative_prompt="[<gs-safe-neg>:x:1] BREAK (<gs-safe-neg>:0) blurry"))
    assert hostile.final_negative_prompt.startswith("<gs-safe-neg>")
    assert hostile.final_negative_prompt.count("gs-safe") == 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("hires", [None, HiresSpec(scale=1.5, denoise=0.5, steps=2)])
def test_quantity_in_batches_gives_the_one_by_one_images(pipes, family, hires):
    """`quantity` at the family's default batch size (one generator per image, seeds 5, 6, ...) against the
    same seeds one by one: the same images. Not always bit for bit: on CPU a batched matmul or convolution
    sums in another order than at batch 1, so a float32 value can move by an ulp, and an ulp right at a
    rounding edge of the 0-255 conversion moves that pixel by one level (measured: some pixels of some
    images, never more). So: identical or at most 1/255 apart per channel, and never another image."""
    import numpy as np

    from genserve.core.config.worker import WorkerConfig

    pipe, safety = pipes(family)
    size = WorkerConfig().batch_size[family]
    assert size > 1
    request = _request(seeds=list(range(5, 5 + size + 1)), prompt="a [fox:cat:0.5]", steps=3, hires=hires)
    with one_torch_thread():
        alone = generate(pipe, request, safety=safety, model=MODEL, batch_size=1)
        batched = generate(pipe, request, safety=safety, model=MODEL, batch_size=size)
    assert batched.timings_ms["batch_size"] == size
    assert [i.seed for i in batched.images] == request.seeds
    for a, b in zip(alone.images, batched.images, strict=True):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1
        assert a.infotext == b.infotext
    # the last seed ran in a batch of one: bit for bit
    assert alone.images[-1].image.tobytes() == batched.images[-1].image.tobytes()
    assert differ(batched.images[0].image, batched.images[1].image) > 1.0

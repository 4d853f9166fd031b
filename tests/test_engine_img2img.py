"""img2img and inpaint on the tiny SD1 and SDXL pipelines: strength, resize modes, mask paste-back, infotext."""

from __future__ import annotations

import numpy as np
import pytest
from engine_support import differ, one_torch_thread, pixels
from PIL import Image, ImageDraw

from genserve.engine import face_fix, img2img
from genserve.engine.generate import ModelInfo, generate
from genserve.engine.infotext import read_png_infotext
from genserve.generation.worker.wire import FaceFixSpec, InitSpec, WorkerRequest

MODEL = ModelInfo(name="tiny", model_hash="0123456789")
DIGEST = "0" * 64


@pytest.fixture(params=["sd1", "sdxl"])
def tiny(request, pipes):
    return pipes(request.param)


def _input(width: int = 64, height: int = 64) -> Image.Image:
    """A smooth gradient with a disc: structure a resize or a denoise visibly changes."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    image = Image.fromarray(np.stack([x, y, 255 - x], axis=2).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(250, 200, 30))
    return image


def _spec(workflow: str = "img2img", **kw) -> InitSpec:
    base = dict(workflow=workflow, image_key="k/input.png", image_sha256=DIGEST)
    if workflow == "inpaint":
        base.update(mask_key="k/mask.png", mask_sha256=DIGEST)
    return InitSpec(**{**base, **kw})


def _request(spec: InitSpec | None, **kw) -> WorkerRequest:
    base = dict(job_id="job-1", checkpoint_id="tiny", prompt="a photo of a cat", sampler="Euler a", steps=4,
                width=64, height=64, seeds=[7], init=spec)
    return WorkerRequest(**{**base, **kw})


def _run(pipe, safety, request, init):
    with one_torch_thread():
        return generate(pipe, request, safety=safety, model=MODEL, init=init)


def test_strength_zero_returns_the_input_and_higher_strengths_change_more(tiny):
    pipe, safety = tiny
    source = _input()
    same = _run(pipe, safety, _request(_spec(denoise=0.0)), (source, None)).images[0].image
    assert differ(same, source) < 1.0  # the input itself (only resized to the working size, here a no-op)
    low = _run(pipe, safety, _request(_spec(denoise=0.3)), (source, None)).images[0].image
    high = _run(pipe, safety, _request(_spec(denoise=1.0)), (source, None)).images[0].image
    assert differ(low, source) > 1.0 and differ(high, low) > 1.0
    again = _run(pipe, safety, _request(_spec(denoise=0.3)), (source, None)).images[0].image
    assert again.tobytes() == low.tobytes()  # a seed reproduces


def test_infotext_names_the_denoising_strength_and_mask_fields(pipes):
    pipe, safety = pipes("sd1")
    source = _input()
    out = _run(pipe, safety, _request(_spec(denoise=0.5)), (source, None))
    info = read_png_infotext(out.images[0].encode())
    assert info.params["Denoising strength"] == "0.5" and info.params["Steps"] == "4"
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 40, 40), fill=255)
    out = _run(pipe, safety, _request(_spec("inpaint", denoise=0.6, mask_blur=2, padding=8)), (source, mask))
    info = read_png_infotext(out.images[0].encode())
    assert info.params["Mask blur"] == "2" and info.params["Inpaint area"] == "Only masked"
    assert info.params["Masked area padding"] == "8" and info.params["Denoising strength"] == "0.6"


@pytest.mark.parametrize("only_masked", [True, False])
def test_inpaint_keeps_every_pixel_outside_the_blurred_mask(tiny, only_masked):
    pipe, safety = tiny
    source = _input(96, 80)  # not the working size: only-masked crops, the whole-image path resizes
    mask = Image.new("L", source.size, 0)
    ImageDraw.Draw(mask).rectangle((40, 30, 60, 50), fill=255)
    blur = 3
    spec = _spec("inpaint", denoise=1.0, mask_blur=blur, only_masked=only_masked, padding=16,
                 resize_mode="just_resize")
    request = _request(spec, width=64, height=64)
    out = _run(pipe, safety, request, (source, mask)).images[0].image
    # the blur band: PIL's Gaussian reaches at most ~3 sigma past the mask's edge
    band = Image.new("L", source.size, 0)
    ImageDraw.Draw(band).rectangle((40 - 3 * blur - 1, 30 - 3 * blur - 1, 60 + 3 * blur + 1, 50 + 3 * blur + 1),
                                   fill=255)
    if only_masked:
        assert out.size == source.size  # A1111: the result is the input with the repainted box pasted back
        reference = source
        keep = np.asarray(band) == 0
    else:
        assert out.size == (64, 64)
        reference = img2img.resize_image(source, 64, 64, "just_resize")
        keep = np.asarray(img2img.resize_image(band, 64, 64, "just_resize")) == 0
    delta = np.abs(pixels(out) - pixels(reference)).max(axis=2)
    assert delta[keep].max() <= 1, "a pixel outside the mask changed"
    inside = np.asarray(img2img.resize_image(mask, *out.size, "just_resize")) == 255
    assert delta[inside].mean() > 5, "the masked region was not repainted"


def test_resize_modes_follow_a1111():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    ImageDraw.Draw(wide).rectangle((0, 0, 49, 99), fill=(0, 0, 255))  # the left quarter blue
    stretched = img2img.resize_image(wide, 64, 64, "just_resize")
    assert stretched.size == (64, 64) and stretched.getpixel((2, 32))[2] > 200
    cropped = img2img.resize_image(wide, 64, 64, "crop_and_resize")
    # cover: 128x64, centre-cropped: the blue quarter (32 px of 128) is cut off to its last 0 columns
    assert cropped.size == (64, 64) and cropped.getpixel((2, 32))[0] > 200
    filled = img2img.resize_image(wide, 64, 64, "resize_and_fill")
    # fit: 64x32 in the middle; the bands above and below stretch the edge rows (blue left, red right)
    assert filled.size == (64, 64) and filled.getpixel((2, 2))[2] > 200 and filled.getpixel((60, 62))[0] > 200


def test_crop_region_grows_to_the_working_aspect_inside_the_image():
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).rectangle((40, 45, 49, 54), fill=255)
    box = img2img.crop_region(mask, 5)
    assert box == (35, 40, 55, 60)
    x1, y1, x2, y2 = img2img.expand_to_ratio(box, 128, 64, 100, 100)
    assert (x2 - x1) == 2 * (y2 - y1) and 0 <= x1 and x2 <= 100
    x1, y1, x2, y2 = img2img.expand_to_ratio((0, 0, 10, 90), 64, 64, 100, 100)
    assert (x1, x2) == (0, 90) and (y1, y2) == (0, 90)


def test_face_fix_repaints_only_the_reported_face_box(tiny):
    """The detector is forced to report one face box (a synthetic image has no face NudeNet would find):
    everything outside that box, its 4 px dilation and the mask blur's reach stays as generated."""
    pipe, safety = tiny
    box = (16, 12, 40, 36)
    calls = []

    def detector(image, min_score):  # noqa: ANN001, ANN202
        calls.append(min_score)
        return [(box, 0.9), ((0, 0, 4, 4), 0.1)]  # the second is under the confidence: ignored

    base = _request(None, steps=3)
    plain = _run(pipe, safety, base, None).images[0].image
    spec = FaceFixSpec(denoise=1.0, mask_blur=2, padding=8)
    fixed_out = _run_face(pipe, safety, base.model_copy(update={"face_fix": spec}), detector)
    fixed = fixed_out.images[0].image
    assert calls == [0.3]
    reach = face_fix.DILATE_PX + 3 * spec.mask_blur + 1
    outside = np.ones((64, 64), bool)
    outside[max(box[1] - reach, 0):box[3] + reach, max(box[0] - reach, 0):box[2] + reach] = False
    delta = np.abs(pixels(fixed) - pixels(plain)).max(axis=2)
    assert delta[outside].max() <= 1 and delta[box[1]:box[3], box[0]:box[2]].mean() > 5
    info = read_png_infotext(fixed_out.images[0].encode())
    assert info.params["ADetailer denoising strength"] == "1" and info.params["ADetailer confidence"] == "0.3"
    nothing = _run_face(pipe, safety, base.model_copy(update={"face_fix": spec}), lambda image, score: [])
    assert nothing.images[0].image.tobytes() == plain.tobytes()  # no face found: the image as generated


def _run_face(pipe, safety, request, detector):  # noqa: ANN001, ANN202
    with one_torch_thread():
        return generate(pipe, request, safety=safety, model=MODEL, face_detector=detector)

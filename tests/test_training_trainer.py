"""The trainer on the tiny SD1/SDXL pipelines: it learns, stops between steps, resumes exactly,
and its kohya export loads in diffusers with the trained scale and changes generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_support import toy_image, toy_zip

from genserve.engine.loading import load_pipeline
from training.buckets import assign_bucket, epoch_batches, make_buckets, steps_per_epoch
from training.checkpoint import load_checkpoint
from training.config import IntakeLimits, TrainingLimits
from training.export import ALLOWED_METADATA, ExportInfo, kohya_state_dict, verify_export, write_lora
from training.intake import run_intake
from training.params import TrainingRequest, resolve
from training.trainer import BaseModelRef, LoraTrainer, TrainHooks

LIMITS = TrainingLimits.load(Path(__file__).parents[1] / "configs" / "training.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box it is several times faster than two (and is
    what a Ray Job's entrypoint gets, OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_dataset(tmp_path: Path, n: int = 4) -> Path:
    out = tmp_path / "dataset"
    run_intake(toy_zip(tmp_path / "toy.zip", n), out, IntakeLimits())
    return out


def make_trainer(family, tiny_models, dataset: Path, work: Path, *, safety=None, samples=None,  # noqa: ANN001
                 **params) -> LoraTrainer:
    request = TrainingRequest(**{"epochs": 3, "repeats": 2, "batch_size": 2, "network_dim": 4, "network_alpha": 2,
                                 "unet_lr": 1e-2, "lr_scheduler": "constant", "gradient_checkpointing": False,
                                 "seed": 11, **params})
    resolved = resolve(request, family, LIMITS, 4, default_seed=0)
    return LoraTrainer(BaseModelRef(family, tiny_models[family].diffusers_dir), dataset, resolved,
                       trigger_words=["tqz"], work_dir=work, device="cpu", safety=safety, samples=samples)


def test_buckets_keep_aspect_and_plan_is_deterministic() -> None:
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert assign_bucket(600, 1000, buckets) == (384, 640)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert make_buckets(512, 64, enable=False) == [(512, 512)]
    assigned = [(512, 512)] * 3 + [(384, 640)] * 2
    batches = epoch_batches(assigned, repeats=2, batch_size=4, seed=5, epoch=1)
    assert batches == epoch_batches(assigned, repeats=2, batch_size=4, seed=5, epoch=1)
    assert batches != epoch_batches(assigned, repeats=2, batch_size=4, seed=5, epoch=2)
    assert len(batches) == steps_per_epoch(assigned, 2, 4) == 3  # 6 square items -> 2 batches, 4 portrait -> 1
    assert all(len({assigned[i] for i in b}) == 1 for b in batches)  # never mixes buckets
    assert sorted(i for b in batches for i in b) == sorted(list(range(5)) * 2)


def test_training_learns_stops_between_steps_and_resumes_exactly(tmp_path: Path, tiny_models) -> None:
    dataset = toy_dataset(tmp_path)
    full = make_trainer("sd1", tiny_models, dataset, tmp_path / "full")
    assert (full.steps_per_epoch, full.total_steps) == (4, 12)
    before = full.validation_loss()
    result = full.train()
    assert result.completed and (result.step, result.epoch) == (12, 3)
    after = full.validation_loss()
    assert after < before - 0.01, (before, after)  # it learned the toy target
    expected = full.adapter_state_dict()

    # stopped between steps 6 and 7 (mid-epoch 2): the last checkpoint is epoch 1 at step 4
    stopped = make_trainer("sd1", tiny_models, dataset, tmp_path / "stopped")
    seen = []
    result = stopped.train(TrainHooks(on_progress=lambda p: seen.append(p.step), should_stop=lambda: len(seen) >= 6))
    assert not result.completed and (result.step, result.epoch) == (6, 1)
    ckpt = tmp_path / "stopped" / "checkpoints" / "epoch-000001"
    state = load_checkpoint(ckpt)
    assert (state.step, state.epoch) == (4, 1)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    for name in ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors"):
        with safe_open(str(ckpt / name), "pt") as f:  # plain safetensors: nothing to unpickle
            assert list(f.keys())

    resumed = make_trainer("sd1", tiny_models, dataset, tmp_path / "resumed")
    resumed.resume(ckpt)
    assert (resumed.step, resumed.epoch) == (4, 1)
    result = resumed.train()
    assert result.completed and (result.step, result.epoch) == (12, 3)
    got = resumed.adapter_state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_export_loads_in_diffusers_and_changes_generation(family: str, tmp_path: Path, tiny_models) -> None:
    dataset = toy_dataset(tmp_path)
    trainer = make_trainer(family, tiny_models, dataset, tmp_path / "work", epochs=1, repeats=1,
                           text_encoder_lr=1e-3, unet_lr=5e-2, shuffle_caption=True, caption_dropout_rate=0.2)
    trainer.train()
    info = ExportInfo(family=family, base_model=f"tiny-{family}", network_dim=4, network_alpha=2.0,
                      trigger_words=["tqz"], steps=trainer.step, epochs=1, resolution=64, num_images=4, title="toy")
    path = write_lora(tmp_path / "toy.safetensors", trainer.adapter_state_dict(), info)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert set(meta) <= ALLOWED_METADATA
    assert meta["genserve.service"] == "genserve" and meta["ss_network_alpha"] == "2" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["genserve.trigger_words"]) == ["tqz"] and meta["ss_num_train_images"] == "4"
    assert not any(str(tmp_path) in v or "img0" in v for v in meta.values())  # no dataset paths or names
    prefixes = {"sd1": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert {"_".join(k.split("_")[:2]) for k in keys} == prefixes
    tensors = load_file(str(path))
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 2.0 for a in alphas)
    assert len(alphas) * 2 == len(tensors) - len(alphas)  # one alpha per down/up pair

    # the trained pipeline: the exported file reproduces the trained adapter (scale alpha/dim kept)
    assert verify_export(trainer.pipe, path, family) < 1e-4

    # a fresh pipeline: diffusers reads the kohya keys and the LoRA changes the image
    pipe = load_pipeline(family, tiny_models[family].diffusers_dir, "diffusers", device="cpu")
    kwargs = dict(prompt="tqz, toy square", num_inference_steps=3, height=64, width=64, output_type="np")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(load_file(str(path)), adapter_name="toy")
    with_lora = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert float(abs(with_lora - base).mean()) > 1e-3
    # the alpha tensor is honoured: halving it halves the adapter's effect on the UNet weights' delta
    halved = {k: (v / 2 if k.endswith(".alpha") else v) for k, v in tensors.items()}
    pipe.load_lora_weights(halved, adapter_name="halved")
    pipe.set_adapters(["halved"])
    half = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert 1e-4 < float(abs(half - base).mean()) < float(abs(with_lora - base).mean())


def test_kohya_names_and_alpha_of_a_known_adapter() -> None:
    adapter = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 64),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 48),
    }
    out = kohya_state_dict(adapter, "sdxl", alpha=3.0)
    assert set(out) == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    assert float(out["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 3.0
    with pytest.raises(ValueError):
        kohya_state_dict({"vae.x.lora_A.weight": torch.ones(1)}, "sd1", alpha=1.0)


def test_sdxl_buckets_and_uncached_latents_train_identically(tmp_path: Path, tiny_models) -> None:
    """Mixed aspect ratios land in their own buckets (SDXL gets the crop/size conditioning), and
    encoding latents every step draws exactly what the latent cache gives."""
    src = tmp_path / "mixed"
    src.mkdir()
    for i, size in enumerate([(128, 128), (128, 128), (64, 128), (64, 128)]):
        toy_image(i, size).save(src / f"{i}.png")
    dataset = tmp_path / "dataset"
    run_intake(src, dataset, IntakeLimits())
    losses = {}
    for cache in (True, False):
        trainer = make_trainer("sdxl", tiny_models, dataset, tmp_path / f"w{cache}", resolution=128, epochs=1,
                               repeats=1, cache_latents=cache)
        assert sorted({item.bucket for item in trainer.items}) == [(64, 192), (128, 128)]
        assert trainer._time_ids(2) == [128, 64, 0, 16, 192, 64]  # 64x128 -> 96x192, 16 px cropped on the left
        losses[cache] = trainer.train().losses
    assert len(losses[True]) == 2 and losses[True] == losses[False]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sample_previews_carry_the_mandatory_safety_embeddings(family, tiny_models, tmp_path, monkeypatch) -> None:
    from safety.embeddings import EmbeddingSpec, SafetyEmbeddings
    from training.config import SampleSettings

    emb = tiny_models[family].embeddings
    safety = SafetyEmbeddings(family, general=EmbeddingSpec("<gs-safe-neg>", emb["general"]),
                              minor=EmbeddingSpec("<gs-safe-minor>", emb["minor"]))
    trainer = make_trainer(family, tiny_models, toy_dataset(tmp_path), tmp_path / "work", epochs=1,
                           safety=safety, samples=SampleSettings(count=1, steps=1))
    safety.check(trainer.pipe)  # the embeddings really sit in the text encoder(s)
    seen = {}
    real_call = type(trainer.pipe).__call__

    def spy(pipe, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - records what reaches the pipeline
        seen.update(kwargs)
        return real_call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(trainer.pipe), "__call__", spy)
    samples = trainer.render_samples()
    assert len(samples) == 1
    assert seen["negative_prompt"] == ["<gs-safe-neg> <gs-safe-minor>"]

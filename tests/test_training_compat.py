"""What kohya / ai-toolkit / Civitai trainer users expect: their optimizers and LR schedulers, their own
sample prompts and sampling schedule, LoCon and DoRA networks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_training_trainer import LIMITS, make_trainer, toy_dataset

from genserve.core.errors import InvalidRequest
from training import params as params_mod
from training.optimizers import build_lr_scheduler, build_optimizer
from training.params import TrainingRequest, check_optimizer, resolve
from training.sample_prompts import parse_line, parse_sample_prompts


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resolved(**kw):
    return resolve(TrainingRequest(**{"epochs": 2, "repeats": 1, "batch_size": 2, **kw}), "sd1", LIMITS, 4,
                   default_seed=1)


@pytest.mark.parametrize("name", ["linear", "constant_with_warmup", "polynomial", "constant", "cosine"])
def test_lr_schedulers_follow_their_curves(name: str) -> None:
    p = _resolved(lr_scheduler=name, lr_warmup_steps=2, unet_lr=1e-2, lr_scheduler_power=2.0)
    weight = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [weight], "lr": p.unet_lr}], p)
    sched = build_lr_scheduler(opt, p, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name == "constant":
        assert lrs == [1e-2] * 10  # kohya's constant has no warm-up either
    else:
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2)  # warm-up
    if name == "constant_with_warmup":
        assert lrs[2:] == [pytest.approx(1e-2)] * 8
    if name == "linear":
        assert lrs[2:] == [pytest.approx(1e-2 * (10 - s) / 8) for s in range(2, 10)]
    if name in ("polynomial", "cosine"):
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] < 5e-3


def test_optimizers_build_with_their_settings() -> None:
    weight = torch.nn.Parameter(torch.zeros(64, 64))
    assert type(build_optimizer([{"params": [weight], "lr": 1.0}], _resolved(optimizer="prodigy"))).__name__ == "Prodigy"
    ada = build_optimizer([{"params": [weight], "lr": 1e-3}], _resolved(optimizer="adafactor", unet_lr=1e-3))
    assert type(ada).__name__ == "Adafactor" and ada.param_groups[0]["relative_step"] is False
    assert ada.param_groups[0]["lr"] == 1e-3


def test_missing_optimizer_package_is_refused_at_submit_naming_the_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    params_mod.optimizer_problem.cache_clear()
    try:
        with pytest.raises(InvalidRequest) as err:
            _resolved(optimizer="adamw8bit")
        assert err.value.code == "optimizer_unavailable"
        assert err.value.details["extra"] == "train" and err.value.details["package"] == "bitsandbytes"
        assert "genserve[train]" in str(err.value)
    finally:
        params_mod.optimizer_problem.cache_clear()


def test_unusable_bitsandbytes_is_refused_at_submit(monkeypatch) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (extra `train`)")
    import bitsandbytes as bnb

    class Broken:
        def __init__(self, *a, **k):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Broken)
    params_mod.optimizer_problem.cache_clear()
    try:
        with pytest.raises(InvalidRequest) as err:
            check_optimizer("adamw8bit")
        assert err.value.code == "optimizer_unavailable" and "no kernel" in str(err.value)
    finally:
        params_mod.optimizer_problem.cache_clear()


def _bnb_problem() -> str | None:
    params_mod.optimizer_problem.cache_clear()
    return params_mod.optimizer_problem("adamw8bit")


@pytest.mark.parametrize(("optimizer", "scheduler"), [
    ("adamw8bit", "linear"), ("prodigy", "constant_with_warmup"), ("adafactor", "polynomial"),
])
def test_each_optimizer_trains_checkpoints_and_resumes(tmp_path: Path, tiny_models, optimizer: str,
                                                       scheduler: str) -> None:
    if optimizer == "adamw8bit" and (problem := _bnb_problem()):
        pytest.skip(problem)
    dataset = toy_dataset(tmp_path, n=2)
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    kw = {"optimizer": optimizer, "lr_scheduler": scheduler, "lr_warmup_steps": 1, "epochs": 2, "repeats": 1,
          "unet_lr": lr, "cache_latents": True}
    trainer = make_trainer("sd1", tiny_models, dataset, tmp_path / "a", **kw)
    assert trainer.total_steps == 2
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    result = trainer.train()
    assert result.completed and result.step == 2
    after = trainer.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the optimizer moved the weights
    resumed = make_trainer("sd1", tiny_models, dataset, tmp_path / "b", **kw)
    resumed.resume(tmp_path / "a" / "checkpoints" / "epoch-000001")
    assert (resumed.step, resumed.epoch) == (1, 1)
    resumed.train()
    for k, v in resumed.adapter_state_dict().items():
        torch.testing.assert_close(v, after[k])  # exact resume with this optimizer's state


def test_kohya_sample_prompt_lines_parse_and_are_checked() -> None:
    sp = parse_line("1girl, solo --n lowres, bad hands --w 64 --h 128 --d 42 --l 5.5 --s 8")
    assert (sp.prompt, sp.negative, sp.width, sp.height, sp.seed, sp.guidance_scale, sp.steps) == \
        ("1girl, solo", "lowres, bad hands", 64, 128, 42, 5.5, 8)
    assert parse_line("# a comment") is None and parse_line("   ") is None
    assert parse_line("a cat").negative == ""
    assert len(parse_sample_prompts(["a cat\n# skip\na dog --s 4"], LIMITS, 64)) == 2
    for bad in ["a cat --ss euler_a", "a cat --w 65", "a cat --s 1000", "a cat --l x", " --n only negative"]:
        with pytest.raises(InvalidRequest) as err:
            parse_sample_prompts([bad], LIMITS, 64)
        assert err.value.code == "invalid_sample_prompt", bad
    with pytest.raises(InvalidRequest):
        _resolved(sample_prompts=["a cat --w 4096"])
    assert _resolved(sample_prompts=["a cat --s 4", "  "]).sample_prompts == ("a cat --s 4",)


@pytest.mark.parametrize("network", ["locon", "dora"])
def test_locon_and_dora_train_export_with_kohya_keys_and_load_in_diffusers(tmp_path: Path, tiny_models,
                                                                          network: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from genserve.engine.loading import load_pipeline
    from training.export import ExportInfo, load_kohya_with_peft, verify_export, write_lora

    dataset = toy_dataset(tmp_path, n=2)
    kw = {"network_type": network, "epochs": 1, "repeats": 2, "unet_lr": 5e-2}
    if network == "locon":
        kw |= {"conv_dim": 2, "conv_alpha": 1}
    trainer = make_trainer("sd1", tiny_models, dataset, tmp_path / "w", **kw)
    trainer.train()
    p = trainer.params
    info = ExportInfo(family="sd1", base_model="tiny-sd1", network_dim=p.network_dim, network_alpha=p.network_alpha,
                      trigger_words=["tqz"], steps=trainer.step, epochs=1, resolution=64, num_images=2, title="t",
                      network_type=p.network_type, conv_dim=p.conv_dim, conv_alpha=p.conv_alpha)
    path = write_lora(tmp_path / "out.safetensors", trainer.adapter_state_dict(), info)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        if network == "locon":
            conv = "lora_unet_down_blocks_0_resnets_0_conv1"
            down, up = f.get_tensor(f"{conv}.lora_down.weight"), f.get_tensor(f"{conv}.lora_up.weight")
            assert down.shape[0] == 2 and down.shape[2:] == (3, 3) and up.shape[1:] == (2, 1, 1)  # conv_dim, 3x3
            assert f.get_tensor(f"{conv}.alpha").item() == 1.0  # conv_alpha
            to_q = next(k for k in keys if k.endswith("attn1_to_q.alpha"))
            assert f.get_tensor(to_q).item() == 2.0  # network_alpha
            assert any("_resnets_0_time_emb_proj" in k for k in keys)
            assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
        else:
            scales = [k for k in keys if k.endswith(".dora_scale")]
            assert scales and all(f.get_tensor(k).dim() in (2, 4) and f.get_tensor(k).shape[1] == 1 for k in scales)
            assert meta["ss_network_module"] == "lycoris.kohya"
    error = verify_export(trainer.pipe, path, "sd1", prompt="tqz", resolution=64)
    assert error < 1e-3
    from safety.likeness import fingerprint_lora

    assert not fingerprint_lora(load_file(str(path)), meta).empty  # the likeness blocklist can check it
    # and it changes generation on a fresh pipeline
    pipe = load_pipeline("sd1", tiny_models["sd1"].diffusers_dir, "diffusers", None, torch_dtype=torch.float32,
                         device="cpu")
    gen = dict(prompt="tqz", num_inference_steps=2, height=64, width=64, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **gen).images
    if network == "dora":  # diffusers' SD loader drops kohya's dora_scale: loaded with PEFT
        load_kohya_with_peft(pipe, load_file(str(path)), "sd1", "exported")
        pipe.set_adapters(["exported"])
    else:
        pipe.load_lora_weights(str(path))
    after = pipe(generator=torch.Generator().manual_seed(0), **gen).images
    assert abs(after - before).max() > 1e-3

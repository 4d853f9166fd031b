"""bench/serve.py's parts that run without the service: the ratio's interval, and the GPU path's FLOP
count and denoising loop, here on the meta device and a tiny UNet on the CPU (no GPU exists here)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
import torch

from genserve.tinymodels import tiny_sdxl_unet_config

SERVE = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", SERVE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_is_a_point_for_a_constant_ratio_and_brackets_a_noisy_one(bench):
    direct = [1.0 + 0.01 * i for i in range(30)]
    low, high = bench._ratio_ci([1.04 * d for d in direct], direct)
    assert low == pytest.approx(1.04) and high == pytest.approx(1.04)

    e2e = [d * (1.04 + (0.05 if i % 3 else -0.05)) for i, d in enumerate(direct)]
    low, high = bench._ratio_ci(e2e, direct)
    ratio = statistics.median(e2e) / statistics.median(direct)
    assert low < ratio < high and high - low > 0.01


def test_one_sdxl_cfg_step_at_1024_counts_about_13_5_tflop(bench):
    """The figure the utilisation rests on, counted from the real-size architecture the GPU path builds."""
    config = bench._sdxl_unet_config()
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        params = sum(p.numel() for p in UNet2DConditionModel(**config).parameters())
    assert params == pytest.approx(2.567e9, rel=0.005)  # SDXL base's UNet
    flops = bench.cfg_step_flops(config)
    assert flops / 1e12 == pytest.approx(13.52, rel=0.01)
    assert bench.cfg_step_flops(config, side=512) < flops / 3


def test_denoiser_runs_one_batched_cfg_call_per_step_and_is_seeded(bench):
    from diffusers import UNet2DConditionModel

    config = tiny_sdxl_unet_config()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    batches = []
    unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    one_image = bench.cfg_denoiser(unet, config, steps=3, side=64, device=torch.device("cpu"), dtype=torch.float32)

    torch.manual_seed(7)
    first = one_image()
    torch.manual_seed(7)
    again = one_image()
    assert batches == [2] * 6  # 3 steps, unconditional and conditional in one call, twice
    assert first.shape == (1, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again)

"""LoRA training speed.

Default (CPU): optimizer steps per second of the trainer on the tiny SD1 and SDXL models at 64 px
(batch 2, dim 4, latents cached, one intra-op thread as a Ray Job's entrypoint gets), measured after
warm-up steps on a toy dataset, for each network type: LoRA, LoCon (conv layers too, conv_dim 4)
and DoRA.

`--device cuda --real-size`: a real-size SDXL UNet (2.6 B parameters, random weights, bf16) with a
rank-32 LoRA on kohya's default targets, gradient checkpointing and AdamW, at 1024x1024 (128x128
latents), batch 1: seconds per step and peak GPU memory. Text encoders and VAE are left out (their
outputs are cached in a real run), so this is the UNet's training cost.

    .venv/bin/python bench/train.py
    .venv/bin/python bench/train.py --device cuda --real-size
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)


def tiny_steps_per_s(family: str, steps: int, warmup: int, batch_size: int, network: str = "lora") -> float:
    from genserve.tinymodels import build_tiny_models
    from training.config import IntakeLimits, TrainingLimits
    from training.intake import run_intake
    from training.params import TrainingRequest, resolve
    from training.trainer import BaseModelRef, LoraTrainer

    sys.path.insert(0, str(_HERE.parent / "tests"))
    from training_support import toy_zip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build_tiny_models(root / "models", families=[family])
        run_intake(toy_zip(root / "toy.zip", 8), root / "dataset", IntakeLimits())
        limits = TrainingLimits.load(_HERE.parent / "configs" / "training.yaml")
        conv = {"conv_dim": 4, "conv_alpha": 4} if network == "locon" else {}
        params = resolve(TrainingRequest(epochs=1, repeats=1, batch_size=batch_size, network_dim=4, network_alpha=4,
                                         gradient_checkpointing=False, lr_scheduler="constant", seed=0,
                                         network_type=network, **conv),
                         family, limits, 8, default_seed=0)
        trainer = LoraTrainer(BaseModelRef(family, models[family].diffusers_dir), root / "dataset", params,
                              work_dir=root / "work", device="cpu")
        batch = list(range(batch_size))
        for _ in range(warmup):
            trainer.train_step(batch)
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch)
        return steps / (time.perf_counter() - started)


def real_size_sdxl(device: str, steps: int, warmup: int) -> dict[str, float]:
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from training.trainer import UNET_TARGETS

    dtype = torch.bfloat16
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET)
    unet.to(dtype=dtype).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    cast_training_params(unet, torch.float32)
    unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(1, 4, 128, 128, device=device, dtype=dtype)
    embeds = torch.randn(1, 77, 2048, device=device, dtype=dtype)
    cond = {"text_embeds": torch.randn(1, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype)}

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=device)
        with torch.autocast(device_type="cuda", dtype=dtype):
            pred = unet(latents + noise, t, embeds, added_cond_kwargs=cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {
        "sdxl_1024_s_per_step": round((time.perf_counter() - started) / steps, 4),
        "sdxl_1024_peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "sdxl_lora_params": float(sum(p.numel() for p in params)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--real-size", action="store_true", help="real-size SDXL UNet at 1024x1024 (CUDA only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--networks", default="lora,locon,dora", help="comma-separated: lora, locon, dora")
    args = parser.parse_args()

    figures: dict[str, float] = {}
    if args.real_size:
        if args.device != "cuda" or not torch.cuda.is_available():
            parser.error("--real-size needs --device cuda on a host with a GPU")
        real = real_size_sdxl("cuda", args.steps, args.warmup)
        figures.update(real)
        print(f"SDXL UNet (real size, bf16, LoRA rank 32) at 1024x1024, batch 1: "
              f"{real['sdxl_1024_s_per_step']:.3f} s/step, peak GPU memory {real['sdxl_1024_peak_gpu_mib']:.0f} MiB")
    else:
        torch.set_num_threads(1)
        for family in ("sd1", "sdxl"):
            for network in args.networks.split(","):
                rate = tiny_steps_per_s(family, args.steps, args.warmup, args.batch_size, network)
                name = f"tiny_{family}_steps_per_s" if network == "lora" else f"tiny_{family}_{network}_steps_per_s"
                figures[name] = round(rate, 2)
                label = {"lora": "LoRA", "locon": "LoCon", "dora": "DoRA"}[network]
                print(f"tiny {family} {label} training at 64 px, batch {args.batch_size}, 1 CPU thread: "
                      f"{rate:.2f} steps/s")
        figures["tiny_batch_size"] = args.batch_size
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()

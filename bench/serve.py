"""Serving overhead: end-to-end time over HTTP vs a direct `pipe()` call, and the LoRA switch cost.

CPU path (default): the tiny SDXL pipeline at 128x128 with the step count calibrated so one direct
call takes about `--target-s` seconds. The same request then goes through the whole service on a
local Ray Serve application (auth, precheck, quote, hold, worker, NudeNet scan, PNG, store, capture)
and the ratio of the medians is reported (target <= 1.05), with the median of the paired ratios
beside it. The direct `pipe()` call runs in the worker replica itself, on the pipeline the service
uses, so both sides of the ratio share one process: on a shared host two processes making the same
call differ by up to 2 % for the whole run (memory placement). The same call in this process is
timed too and its ratio printed beside (`e2e_over_driver_direct_ratio`). `--transport` picks the HTTP ingress: HAProxy (the default here: what the RayService in
deploy/ serves production traffic through) or Serve's proxy (what `genserve serve` uses on a shared
host, see RUNBOOK "Choose the HTTP ingress"). The LoRA switch cost is the median time
to re-activate between two adapters already resident in the worker's LoRA cache (target <= 5 ms).

`--device cuda --real-size`: a real-size random-weight SDXL UNet at 1024x1024, 30 steps with CFG,
reporting images/s and the implied utilisation: the FLOPs of one CFG step, counted by torch on the
meta device (13.5 TFLOP for SDXL at 1024²), against the GPU's dense fp16 peak.

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
# run as a script, bench/ comes first on sys.path, where sibling scripts (safety.py ...) would shadow packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
PEAK_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def _ratio_ci(e2e: list[float], direct: list[float], level: float = 0.95, resamples: int = 4000) -> tuple[float, float]:
    """Bootstrap interval of the ratio of medians, resampling whole ABBA pairs: on a shared host
    one run's estimate moves by a few percent, and the interval says how far."""
    import random

    rng = random.Random(0)
    pairs = list(zip(e2e, direct, strict=True))
    ratios = sorted(
        statistics.median(e for e, _ in sample) / statistics.median(d for _, d in sample)
        for sample in ([rng.choice(pairs) for _ in pairs] for _ in range(resamples))
    )
    tail = (1 - level) / 2
    return ratios[int(tail * resamples)], ratios[int((1 - tail) * resamples) - 1]


def _median_s(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


# ----------------------------------------------------------------------------------------- CPU path


def _environment(data: Path, threads: int, scan_threads: int, transport: str):
    from genserve.bootstrap import bootstrap
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings

    settings = load_settings(env={"GENSERVE_DATA_DIR": str(data)}, overrides={
        "server": {"port": _free_port(), "http_ingress": transport},
        "worker": {"cpu_threads": threads, "scan_threads": scan_threads},
        "generation": {"demo_balance": 10**9},
    })
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store)
    return settings, db, store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _publish_loras(settings, db, store, pipe) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    from engine_loras import make_lora, write_lora

    from genserve.resources.registry import ResourceRegistry

    registry = ResourceRegistry(db, store)
    ids = []
    for seed in (1, 2):
        rid = f"bench-lora-{seed}"
        path = write_lora(settings.data_dir / f"{rid}.safetensors", make_lora(pipe, seed=seed, text_encoder=False))
        registry.publish(path, id=rid, kind="lora", family="sdxl")
        ids.append(rid)
    return ids


def cpu_bench(args) -> dict:
    import torch

    from genserve.generation.jobs import JobStore
    from genserve.generation.worker.core import WorkerCore
    from genserve.generation.worker.wire import WorkerRequest

    torch.set_num_threads(args.threads)
    data = Path(tempfile.mkdtemp(prefix="genserve-bench-"))
    settings, db, store = _environment(data, args.threads, args.scan_threads, args.transport)
    core = WorkerCore("sdxl", settings, db=db, store=store)
    loaded = core.checkpoint("tiny-sdxl")
    pipe = loaded.pipe
    width = height = args.size
    lora_ids = _publish_loras(settings, db, store, pipe)

    # the prompts as the worker builds them (safety embedding first in the negative prompt)
    prompt, negative = loaded.safety.inject(prompt="a red fox in the snow", negative_prompt="blurry", mature=False)

    def direct(steps: int):
        return lambda: bare_pipe(pipe, prompt, negative, steps, width, height)

    direct(1)()  # warm-up
    one, _ = _median_s(direct(1), 3)
    two, _ = _median_s(direct(3), 3)
    per_step = max((two - one) / 2, 1e-3)
    steps = max(1, min(150, 1 + round((args.target_s - one) / per_step)))

    with _service(settings) as http_call:
        http_call(steps, width, height)  # warm-up: loads the checkpoint in the replica
        direct_runs, driver_runs, e2e_runs, job_ids = [], [], [], []

        def over_http() -> None:
            started = time.perf_counter()
            job_ids.append(http_call(steps, width, height))
            e2e_runs.append(time.perf_counter() - started)

        def bare() -> None:
            direct_runs.append(http_call.bare_pipe(prompt, negative, steps, width, height))
            driver_runs.append(_median_s(direct(steps), 1)[0])

        # interleaved in pairs, the order swapped every pair (ABBA): a shared machine's speed drifts
        # over seconds, and each pair then sees it from both sides
        for i in range(args.runs):
            for run in (bare, over_http) if i % 2 == 0 else (over_http, bare):
                run()
        stages = [JobStore(db).get(job_id).result["timings_ms"] for job_id in job_ids]
        noop_s = http_call.noop()

    # LoRA switch: both adapters resident, alternate which one is active
    for rid in lora_ids:
        core.generate(WorkerRequest(job_id=f"warm-{rid}", checkpoint_id="tiny-sdxl", prompt="warm", steps=1,
                                    width=64, height=64, seeds=[0], loras=[{"resource_id": rid, "strength": 0.8}]))
    names = [loaded.loras.ensure(row.sha256, core.cache.fetch(row.storage_key, row.sha256, "file")).name
             for row in (core.resource(rid, _lora_kind()) for rid in lora_ids)]
    switches = []
    for i in range(args.switches):
        with loaded.lock:
            switches.append(loaded.loras.activate([(names[i % 2], 0.8)]))
    switch_ms = statistics.median(switches)
    print(f"LoRA switch between two cached adapters: median {switch_ms:.2f} ms over {len(switches)} switches")

    core.close()

    direct_s, e2e_s = statistics.median(direct_runs), statistics.median(e2e_runs)
    driver_s = statistics.median(driver_runs)
    worker = {k: round(statistics.median(t.get(k, 0.0) for t in stages), 1) for k in stages[0]}
    ratio = e2e_s / direct_s
    pair_ratio = statistics.median(e / d for e, d in zip(e2e_runs, direct_runs, strict=True))
    ci_low, ci_high = _ratio_ci(e2e_runs, direct_runs)
    print(f"direct pipe() in the worker replica: tiny SDXL {width}x{height}, {steps} steps, {args.threads} "
          f"thread(s): median {direct_s * 1000:.0f} ms over {args.runs} runs (in this process: "
          f"{driver_s * 1000:.0f} ms, ratio {e2e_s / driver_s:.3f})")
    print(f"end to end over HTTP (Ray Serve, {args.transport} ingress, wait=true): median {e2e_s * 1000:.0f} ms, of which the worker "
          f"(fetch, generate, NudeNet scan, PNG) {worker['total_ms']:.0f} ms; HTTP no-op round trip "
          f"{noop_s * 1000:.1f} ms; ratio to direct {ratio:.3f} (95% bootstrap interval {ci_low:.3f}-{ci_high:.3f}; "
          f"target <= 1.05); median of the {args.runs} paired ratios {pair_ratio:.3f}")
    print("worker stages (median ms): " + ", ".join(f"{k} {v}" for k, v in worker.items()))
    return {
        "device": "cpu", "family": "sdxl", "width": width, "height": height, "steps": steps,
        "threads": args.threads, "scan_threads": args.scan_threads, "transport": args.transport, "runs": args.runs,
        "direct_median_ms": round(direct_s * 1000, 1), "e2e_median_ms": round(e2e_s * 1000, 1),
        "driver_direct_median_ms": round(driver_s * 1000, 1), "e2e_over_driver_direct_ratio": round(e2e_s / driver_s, 4),
        "e2e_over_direct_ratio": round(ratio, 4), "ratio_ci95": [round(ci_low, 4), round(ci_high, 4)], "paired_ratio_median": round(pair_ratio, 4), "overhead_ms": round((e2e_s - direct_s) * 1000, 1),
        "ingress_overhead_ms": round(e2e_s * 1000 - worker["total_ms"], 1),
        "lora_switch_ms": round(switch_ms, 3), "http_noop_ms": round(noop_s * 1000, 2), "worker_stages_ms": worker,
        "direct_runs_ms": [round(t * 1000, 1) for t in direct_runs],
        "driver_direct_runs_ms": [round(t * 1000, 1) for t in driver_runs],
        "e2e_runs_ms": [round(t * 1000, 1) for t in e2e_runs],
    }


def bare_pipe(pipe, prompt: str, negative: str, steps: int, width: int, height: int):
    """The direct call the ratio divides by (timed in the replica and in this process): the pipeline
    alone, seeded."""
    import torch

    return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, width=width, height=height,
                guidance_scale=7.0, generator=torch.Generator().manual_seed(42))


def _lora_kind():
    from genserve.resources.models import ResourceKind

    return ResourceKind.lora


def _timed_worker():
    """The worker deployment plus the one call this benchmark adds: a bare `pipe()` on the replica's
    own loaded pipeline (under its lock, in a thread as a generation runs), timed in the replica."""
    import asyncio

    from genserve.generation.worker.deployment import FamilyWorker

    class TimedWorker(FamilyWorker.func_or_class):
        async def bare_pipe_s(self, checkpoint_id, prompt, negative, steps, width, height) -> float:
            loaded = await self.get_checkpoint(checkpoint_id)

            def call() -> float:
                with loaded.lock:
                    started = time.perf_counter()
                    bare_pipe(loaded.pipe, prompt, negative, steps, width, height)
                    return time.perf_counter() - started

            return await asyncio.to_thread(call)

    return FamilyWorker.options(func_or_class=TimedWorker)


@contextlib.contextmanager
def _service(settings):
    """The service on a local Ray Serve application; yields a call that runs one generation over HTTP."""
    import httpx
    import ray
    from ray import serve

    from genserve.app import APP_NAME, build_app, ingress_environment, load_serve_config, worker_name

    config = load_serve_config(settings.config_path(settings.server.serve_config))
    for deployment in config["applications"][0]["deployments"]:
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    os.environ.update(ingress_environment(settings))
    if settings.server.http_ingress == "haproxy":  # beside any other HAProxy on this host
        os.environ.update(RAY_SERVE_HAPROXY_STATS_PORT=str(_free_port()), RAY_SERVE_HAPROXY_METRICS_PORT=str(_free_port()))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    headers = {"Authorization": f"Bearer {settings.auth.service_token.get_secret_value()}",
               "X-User-Id": settings.generation.demo_user}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.server.port})
        serve.run(build_app(settings, config, worker=_timed_worker()), name=APP_NAME, route_prefix="/")
        worker = serve.get_deployment_handle(worker_name("sdxl"), app_name=APP_NAME)
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.server.port}", timeout=600) as client:
            def call(steps: int, width: int, height: int) -> str:
                body = {"prompt": "a red fox in the snow", "negative_prompt": "blurry", "checkpoint": "tiny-sdxl",
                        "steps": steps, "sampler": "Euler", "cfg_scale": 7.0, "width": width, "height": height,
                        "seed": 42}
                r = client.post("/v1/generations?wait=true&timeout=600", json=body, headers=headers)
                r.raise_for_status()
                if r.json()["status"] != "succeeded":
                    raise RuntimeError(f"bench generation did not succeed: {r.json()}")
                return r.json()["id"]

            call.noop = lambda: _median_s(lambda: client.get("/v1/healthz").raise_for_status(), 20)[0]
            call.bare_pipe = lambda *a: worker.bare_pipe_s.remote("tiny-sdxl", *a).result()
            yield call
    finally:
        serve.shutdown()
        ray.shutdown()


# ----------------------------------------------------------------------------------------- GPU path


def _sdxl_unet_config() -> dict:
    """The SDXL base UNet architecture (2.57 B parameters)."""
    return dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def cfg_step_flops(config: dict, side: int = 1024) -> int:
    """FLOPs of one CFG step (a batch of 2) of a UNet built from `config` at `side`² pixels, counted
    by torch on the meta device: no weights are allocated and no GPU is needed."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        inputs = _cfg_inputs(config, side, torch.device("meta"), torch.float32)
        latents = torch.randn(2, 4, side // 8, side // 8)
        with FlopCounterMode(display=False) as counter:
            unet(latents, torch.tensor(500.0), **inputs)
    return counter.get_total_flops()


def _cfg_inputs(config: dict, side: int, device, dtype) -> dict:
    """Random text conditioning for a batch of 2 (unconditional, conditional), shaped from `config`."""
    import torch

    text_embeds = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {
        "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text_embeds, device=device, dtype=dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, device=device, dtype=dtype),
        },
    }


def cfg_denoiser(unet, config: dict, steps: int, side: int, device, dtype):
    """One image's denoising loop as the SDXL pipeline runs it: `steps` Euler steps, each one UNet call
    on the unconditional and conditional halves together, guidance 7. Returns a call that returns
    the final latents."""
    import torch
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    inputs = _cfg_inputs(config, side, device, dtype)

    @torch.inference_mode()
    def one_image() -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        latents = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            uncond, cond = unet(x, t, **inputs).sample.chunk(2)
            latents = scheduler.step(uncond + 7.0 * (cond - uncond), t, latents).prev_sample
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return latents

    return one_image


def gpu_bench(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    dtype = torch.float16
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    config = _sdxl_unet_config()
    step_tflop = cfg_step_flops(config) / 1e12
    torch.manual_seed(0)
    # as the worker loads a checkpoint on CUDA: half precision, channels_last, SDPA attention
    unet = UNet2DConditionModel(**config).to(device, dtype, memory_format=torch.channels_last).eval()
    one_image = cfg_denoiser(unet, config, args.gpu_steps, 1024, device, dtype)

    one_image()
    median_s, runs = _median_s(one_image, args.runs)
    images_per_s = 1.0 / median_s
    achieved = step_tflop * args.gpu_steps / median_s
    utilisation = achieved / peak if peak else None
    print(f"real-size SDXL UNet, 1024x1024, {args.gpu_steps} steps with CFG ({step_tflop:.2f} TFLOP each), fp16 "
          f"on {name}: median {median_s:.3f} s per image, {images_per_s:.3f} images/s, {achieved:.0f} TFLOP/s"
          + (f", implied utilisation {utilisation:.1%} of {peak} TFLOP/s" if peak else ""))
    return {"device": name, "steps": args.gpu_steps, "width": 1024, "height": 1024, "runs": args.runs,
            "cfg_step_tflop": round(step_tflop, 3), "image_median_ms": round(median_s * 1000, 1),
            "images_per_s": round(images_per_s, 4), "achieved_tflop_per_s": round(achieved, 1),
            "utilisation_ratio": round(utilisation, 4) if utilisation is not None else None,
            "runs_ms": [round(t * 1000, 1) for t in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (tiny models through the service) or cuda")
    parser.add_argument("--real-size", action="store_true", help="with --device cuda: a real-size SDXL UNet")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--target-s", type=float, default=1.0, help="direct call duration to calibrate steps to")
    parser.add_argument("--size", type=int, default=128, help="image side (an allowed tiny-SDXL size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, direct and in the worker")
    parser.add_argument("--transport", choices=("haproxy", "proxy"), default="haproxy",
                        help="the HTTP ingress (server.http_ingress): HAProxy, as deployed, or Serve's proxy")
    parser.add_argument("--scan-threads", type=int, default=0,
                        help="the worker's image-scan threads (0: every core, as a replica's default)")
    parser.add_argument("--switches", type=int, default=40)
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense fp16 peak of the GPU")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        if not args.real_size:
            parser.error("the CUDA path measures the real-size UNet: add --real-size")
        result = gpu_bench(args)
    else:
        result = cpu_bench(args)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()

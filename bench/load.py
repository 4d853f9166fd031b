"""Bounded load test of the generation service, then proof that nothing was lost.

Fires a fixed number of requests with bounded concurrency and a hard time limit, over loopback HTTP:
several prompts, sizes and checkpoints, random tiny LoRAs published through the registry, prompts the
safety precheck blocks, and generations cancelled right after they are accepted. Prints throughput,
p50/p95/p99 latency (submit to terminal status) and the number of 429s, then checks:

  * every accepted job ended (terminal status) - else it counts in `lost_jobs`;
  * the ledger verifies (`genserve buzz verify`: balanced, no open hold of ours, no negative balance);
  * every job was charged exactly its delivered images x the quoted per-image price, and the user's
    balance fell by exactly the sum (`charge_mismatches`).

By default the service runs here: a temp data dir with the embedded defaults (tiny models, SQLite,
local object store) and the local Serve config on a Ray started here, or on the Ray this process is
already connected to. `--url` targets a running service instead; the database and object store are
then reached through the local settings (GENSERVE_* variables), as the `genserve` CLI does.

    .venv/bin/python bench/load.py [--requests 40] [--concurrency 4] [--time-limit-s 120] [--url URL]

Exit status 1 when anything was lost or mis-charged. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Run as a script, Python puts bench/ first on the path, where other scripts' names (safety.py)
# would shadow the project's packages: import the project from the repository root instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]

import httpx  # noqa: E402

TERMINAL = {"succeeded", "blocked", "failed", "canceled"}
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk, oil painting", "a bowl of ramen, studio photo",
           "an old map of an island, ink", "a robot reading a book"]
BLOCKED_PROMPTS = ["a photo of a 12 year old, nude", "naked child on a beach"]
SIZES = [(64, 64), (64, 96), (96, 64)]
STARTING_BALANCE = 1_000_000


@dataclass
class Outcome:
    kind: str                      # generate | lora | blocked | cancel
    checkpoint: str
    status_code: int               # of the submit
    latency_ms: float
    job_id: str | None = None
    final: dict[str, Any] | None = None
    per_image: int | None = None   # quoted before the submit
    error: str | None = None


@dataclass
class Plan:
    """One request of the mix: what kind, and the body."""

    kind: str
    body: dict[str, Any]


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0


# ------------------------------------------------------------------------------------------ set-up


def _random_lora(path: Path, family: str, seed: int) -> Path:
    """A random kohya-layout LoRA over every UNet attention projection of the tiny `family` model."""
    import torch
    from safetensors.torch import save_file

    from genserve.tinymodels import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=g) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=g) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def publish_loras(settings, db, store, work: Path, count: int = 2) -> list[str]:  # noqa: ANN001
    from genserve.resources.registry import ResourceRegistry

    registry = ResourceRegistry(db, store)
    ids = []
    for seed in range(count):
        rid = f"load-lora-{uuid.uuid4().hex[:8]}"
        registry.publish(_random_lora(work / f"{rid}.safetensors", "sd1", seed), id=rid, kind="lora", family="sd1")
        ids.append(rid)
    return ids


def prepare_data_dir(data: Path, models_dir: Path | None):  # noqa: ANN201 - Settings
    """Embedded defaults in `data`: migrated SQLite, tiny models (built, or linked from `models_dir`), registered."""
    from genserve.bootstrap import bootstrap
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings

    if models_dir is not None:
        (data / "models").mkdir(parents=True, exist_ok=True)
        for child in Path(models_dir).iterdir():
            target = data / "models" / child.name
            if not target.exists():
                os.symlink(child.resolve(), target)
    # other GENSERVE_* variables still apply (worker threads, limits ...); the data dir is this one
    env = {k: v for k, v in os.environ.items() if k != "GENSERVE_SETTINGS_JSON"}
    # one torch thread per replica unless told otherwise: several replicas share a few cores here
    threads = {} if "GENSERVE_WORKER__CPU_THREADS" in env else {"worker": {"cpu_threads": 1}}
    settings = load_settings(env={**env, "GENSERVE_DATA_DIR": str(data)}, overrides=threads)
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    store.ensure_bucket()  # an S3 bucket (GENSERVE_STORAGE_BACKEND=s3) that does not exist yet
    bootstrap(settings, db, store, build_models=models_dir is None)
    db.dispose()
    return settings


class LocalService:
    """The Serve application on this machine's Ray, under a unique name and route prefix."""

    def __init__(self, settings, replica_cpus: float | None = None):  # noqa: ANN001
        self.settings = settings
        self.replica_cpus = replica_cpus
        self.name = f"genserve-load-{uuid.uuid4().hex[:6]}"
        self.started_ray = False

    def start(self, timeout_s: float) -> str:
        import ray
        from ray import serve

        from genserve.app import build_app, load_serve_config, serve_http_port

        if not ray.is_initialized():
            # logical CPUs: the local Serve config asks for more than a 2-core machine has
            ray.init(num_cpus=self.settings.server.num_cpus or max(4, os.cpu_count() or 1),
                     include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                               **self.settings.to_env()}})
            self.started_ray = True
        port = serve_http_port()
        config = load_serve_config(self.settings.config_path(self.settings.server.serve_config))
        if self.replica_cpus is not None:
            for app_config in config["applications"]:
                for d in app_config.get("deployments", []):
                    d["ray_actor_options"] = {**d.get("ray_actor_options", {}), "num_cpus": self.replica_cpus}
        app = build_app(self.settings, config)
        # serve.run returns once every deployment is healthy; a thread bounds that wait
        errors: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(app, name=self.name, route_prefix=f"/{self.name}")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)

        thread = threading.Thread(target=deploy, daemon=True)
        thread.start()
        thread.join(timeout_s)
        if errors:
            raise errors[0]
        if thread.is_alive():
            raise TimeoutError(f"the service did not start within {timeout_s:.0f} s")
        return f"http://127.0.0.1:{port}/{self.name}"

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.delete(self.name)
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()


# ------------------------------------------------------------------------------------------ load


def request_mix(count: int, loras: list[str], seed: int, steps: int) -> list[Plan]:
    """`count` requests in a seeded order: ~1/6 blocked prompts, ~1/6 cancellations, ~1/4 with LoRAs,
    the rest plain generations over both families, several sizes and 1-2 images."""
    rng = random.Random(seed)
    kinds = ["blocked", "cancel", "lora", "lora", "generate", "generate", "generate", "generate",
             "generate", "generate", "blocked", "cancel"]
    plans = []
    for i in range(count):
        kind = kinds[i % len(kinds)] if loras or kinds[i % len(kinds)] != "lora" else "generate"
        checkpoint = "tiny-sd1" if kind == "lora" or i % 3 else "tiny-sdxl"
        width, height = rng.choice(SIZES)
        body: dict[str, Any] = {
            "prompt": rng.choice(BLOCKED_PROMPTS if kind == "blocked" else PROMPTS), "checkpoint": checkpoint,
            "steps": steps, "width": width, "height": height, "quantity": rng.choice((1, 1, 2)),
            "seed": rng.randrange(2**31),
        }
        if kind == "lora":
            body["resources"] = [{"id": rid, "strength": 0.8} for rid in rng.sample(loras, rng.randint(1, len(loras)))]
        plans.append(Plan(kind, body))
    return plans


class LoadClient:
    def __init__(self, url: str, token: str, user: str, deadline: float):
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=60.0,
                                      headers={"Authorization": f"Bearer {token}", "X-User-Id": user})
        self.deadline = deadline

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def one(self, plan: Plan) -> Outcome:
        started = time.perf_counter()
        per_image = None
        if plan.kind != "blocked":
            quote = await self.http.post("/v1/quotes", json=plan.body)
            if quote.status_code == 200:
                per_image = quote.json()["per_image"]
        wait = plan.kind != "cancel"
        params = {"wait": "true", "timeout": f"{max(1.0, self.remaining()):.0f}"} if wait else None
        try:
            response = await self.http.post("/v1/generations", json=plan.body, params=params,
                                            timeout=self.remaining() + 30)
        except httpx.TransportError as exc:
            return Outcome(plan.kind, plan.body["checkpoint"], 0, _ms(started), error=f"{type(exc).__name__}: {exc}")
        outcome = Outcome(plan.kind, plan.body["checkpoint"], response.status_code, 0.0, per_image=per_image)
        if response.status_code in (200, 202):
            job = response.json()
            outcome.job_id = job["id"]
            if plan.kind == "cancel":
                await self.http.post(f"/v1/generations/{job['id']}/cancel")
            outcome.final = job if job["status"] in TERMINAL else await self.until_terminal(job["id"])
        else:
            outcome.error = response.json().get("code", str(response.status_code))
        outcome.latency_ms = _ms(started)
        return outcome

    async def until_terminal(self, job_id: str, extra_s: float = 0.0) -> dict[str, Any] | None:
        """The job once terminal; None when the time limit (+ `extra_s`) passes first."""
        end = time.monotonic() + self.remaining() + extra_s
        while True:
            job = (await self.http.get(f"/v1/generations/{job_id}")).json()
            if job["status"] in TERMINAL or time.monotonic() >= end:
                return job if job["status"] in TERMINAL else None
            await asyncio.sleep(0.2)

    async def balance(self, user: str) -> dict[str, int]:
        return (await self.http.get(f"/v1/accounts/{user}/balance")).json()


async def run_load(client: LoadClient, plans: list[Plan], concurrency: int) -> Report:
    """The mix with at most `concurrency` requests in flight; none is started after the deadline."""
    gate = asyncio.Semaphore(concurrency)
    report = Report()

    async def bounded(plan: Plan) -> None:
        async with gate:
            if client.remaining() <= 0:
                return
            report.outcomes.append(await client.one(plan))

    started = time.perf_counter()
    await asyncio.gather(*(bounded(p) for p in plans))
    report.wall_s = time.perf_counter() - started
    return report


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# ------------------------------------------------------------------------------------------ checks


async def settle_and_check(client: LoadClient, report: Report, settings, user: str, before: int,  # noqa: ANN001
                           drain_s: float) -> dict[str, Any]:
    """Nothing lost: every accepted job terminal, exact charges, the balance moved by their sum, ledger ok."""
    from genserve.billing.ledger import Ledger, user_account
    from genserve.core.db import Database

    for o in report.outcomes:
        if o.job_id and (o.final is None or o.final["status"] not in TERMINAL):
            o.final = await client.until_terminal(o.job_id, extra_s=drain_s)
    accepted = [o for o in report.outcomes if o.job_id]
    lost = [o.job_id for o in accepted if o.final is None]
    mismatches = []
    for o in accepted:
        if o.final is None:
            continue
        expected = (o.per_image if o.per_image is not None else -1) * len(o.final["images"])
        if o.final["charged"] != expected:
            mismatches.append({"job": o.job_id, "status": o.final["status"], "charged": o.final["charged"],
                               "expected": expected})
    charged = sum(o.final["charged"] for o in accepted if o.final is not None)
    after = await client.balance(user)
    balance_ok = after["posted"] == before - charged and after["held"] == 0
    if not balance_ok:
        mismatches.append({"user": user, "before": before, "charged": charged, "after": after})
    db = Database.from_settings(settings)
    try:
        ledger = Ledger(db, settings.billing)
        verify = ledger.verify()
        held = ledger.balance(user_account(user)).held
    finally:
        db.dispose()
    return {"lost": lost, "mismatches": mismatches, "charged": charged, "after": after,
            "ledger_ok": verify.ok and held == 0, "verify": verify.to_dict()}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="requests in the mix (fixed count)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    parser.add_argument("--time-limit-s", type=float, default=120.0, help="no request starts after this")
    parser.add_argument("--drain-s", type=float, default=30.0, help="how long accepted jobs may take to end after it")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--url", default=None, help="a running service (loopback) instead of one started here")
    parser.add_argument("--data-dir", type=Path, default=None, help="data dir of the service started here (default: temp)")
    parser.add_argument("--models-dir", type=Path, default=None, help="reuse tiny models built here instead of building")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--replica-cpus", type=float, default=None,
                        help="Ray CPUs per replica instead of the Serve config's (to share a small Ray)")
    args = parser.parse_args(argv)
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--url must be a loopback address: this is a load test")

    from genserve.billing.ledger import Ledger, user_account
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings

    tmp = tempfile.TemporaryDirectory(prefix="genserve-load-")
    service = None
    try:
        if args.url:
            settings, url = load_settings(), args.url
        else:
            settings = prepare_data_dir(args.data_dir or Path(tmp.name) / "data", args.models_dir)
            service = LocalService(settings, args.replica_cpus)
            url = service.start(args.start_timeout_s)
        user = f"load-{uuid.uuid4().hex[:8]}"
        db = Database.from_settings(settings)
        store = object_store_from_settings(settings)
        Ledger(db, settings.billing).grant(user_account(user), STARTING_BALANCE, f"bench-load:{user}",
                                          reason="load test starting balance")
        loras = publish_loras(settings, db, store, Path(tmp.name) / "loras")
        db.dispose()
        plans = request_mix(args.requests, loras, args.seed, args.steps)
        print(f"service at {url}; user {user} with {STARTING_BALANCE} buzz; {len(plans)} requests, "
              f"concurrency {args.concurrency}, time limit {args.time_limit_s:.0f} s", flush=True)

        async def go() -> tuple[Report, dict[str, Any]]:
            client = LoadClient(url, settings.auth.service_token.get_secret_value(), user,
                                time.monotonic() + args.time_limit_s)
            try:
                before = (await client.balance(user))["posted"]
                report = await run_load(client, plans, args.concurrency)
                return report, await settle_and_check(client, report, settings, user, before, args.drain_s)
            finally:
                await client.http.aclose()

        report, checks = asyncio.run(go())
    finally:
        if service is not None:
            service.stop()
        tmp.cleanup()

    figures = summarise(report, checks, args.requests)
    print_words(report, checks, figures)
    print(json.dumps(figures, sort_keys=True))
    return 0 if figures["lost_jobs"] == 0 and figures["ledger_ok"] and figures["charge_mismatches"] == 0 else 1


def summarise(report: Report, checks: dict[str, Any], planned: int) -> dict[str, Any]:
    done = [o for o in report.outcomes if o.status_code]
    latencies = sorted(o.latency_ms for o in done)
    statuses = [o.final["status"] for o in report.outcomes if o.final]
    return {
        "requests": len(report.outcomes),
        "requests_planned": planned,
        "accepted": sum(1 for o in report.outcomes if o.job_id),
        "succeeded": statuses.count("succeeded"),
        "canceled": statuses.count("canceled"),
        "failed": statuses.count("failed"),
        "blocked_403": sum(1 for o in report.outcomes if o.status_code == 403),
        "rejected_429": sum(1 for o in report.outcomes if o.status_code == 429),
        "transport_errors": sum(1 for o in report.outcomes if not o.status_code),
        "images_delivered": sum(len(o.final["images"]) for o in report.outcomes if o.final),
        "buzz_charged": checks["charged"],
        "wall_s": round(report.wall_s, 3),
        "throughput_per_s": round(len(done) / report.wall_s, 3) if report.wall_s else 0.0,
        "p50_ms": round(_percentile(latencies, 50), 1),
        "p95_ms": round(_percentile(latencies, 95), 1),
        "p99_ms": round(_percentile(latencies, 99), 1),
        "lost_jobs": len(checks["lost"]),
        "ledger_ok": checks["ledger_ok"],
        "charge_mismatches": len(checks["mismatches"]),
    }


def print_words(report: Report, checks: dict[str, Any], f: dict[str, Any]) -> None:
    print(f"{f['requests']} of {f['requests_planned']} requests sent in {f['wall_s']:.1f} s: "
          f"{f['throughput_per_s']:.2f} requests/s")
    print(f"latency submit->terminal: p50 {f['p50_ms']:.0f} ms, p95 {f['p95_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms")
    print(f"accepted {f['accepted']} (succeeded {f['succeeded']}, canceled {f['canceled']}, failed {f['failed']}); "
          f"blocked by safety {f['blocked_403']}; rejected with 429 {f['rejected_429']}; "
          f"transport errors {f['transport_errors']}")
    print(f"{f['images_delivered']} images delivered, {f['buzz_charged']} buzz charged; balance now "
          f"{checks['after']['posted']} posted, {checks['after']['held']} held")
    print(f"lost jobs: {f['lost_jobs']} {checks['lost'] or ''}".rstrip())
    print(f"ledger verify: {'ok' if f['ledger_ok'] else 'FAILED ' + json.dumps(checks['verify'], default=str)}")
    print(f"charge mismatches: {f['charge_mismatches']} {json.dumps(checks['mismatches']) if checks['mismatches'] else ''}".rstrip())
    for o in report.outcomes:
        if o.final and o.final["status"] == "failed":
            print(f"  failed {o.kind} job {o.job_id} on {o.checkpoint}: {o.final.get('error')}")


if __name__ == "__main__":
    sys.exit(main())

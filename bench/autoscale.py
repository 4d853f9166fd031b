"""Local autoscaling check: one worker deployment with min 1 / max 2 replicas scales up under load and
back down after it, and nothing is lost on the way.

Starts the service here (embedded defaults: tiny models, SQLite, local object store, the local Serve
config) with `worker-sd1` autoscaling between 1 and 2 replicas on short delays (the production delays
are minutes), the other deployments fixed at one replica. Then `--concurrency` clients generate sd1
images for `--load-s` seconds, one user each (`wait=true`, retrying a 429 after its Retry-After), while a sampler reads
`worker-sd1`'s running replicas from `serve.status()` every half second. After the load it waits up to
`--settle-s` for the deployment to return to one replica, and checks:

  * every accepted job ended `succeeded` (else it counts in `lost_jobs` or `failed_jobs`);
  * the ledger verifies (`genserve buzz verify`: balanced, no open hold of the users).

    .venv/bin/python bench/autoscale.py [--load-s 40] [--concurrency 6] [--steps 8]

Exit status 1 when it did not scale up, did not come back down, or lost anything. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
sys.path.insert(1, str(_ROOT / "bench"))

import httpx  # noqa: E402
from load import TERMINAL, LocalService, prepare_data_dir  # noqa: E402

WORKER = "worker-sd1"
STARTING_BALANCE = 10_000_000


def autoscaling_overrides(config: dict[str, Any], upscale_s: float, downscale_s: float) -> dict[str, Any]:
    """The local Serve config with worker-sd1 at min 1 / max 2 on short delays, the rest at one replica."""
    for app in config["applications"]:
        for d in app.get("deployments", []):
            auto = d.setdefault("autoscaling_config", {})
            if d["name"] == WORKER:
                auto.update(min_replicas=1, max_replicas=2, target_ongoing_requests=1, metrics_interval_s=1.0,
                            look_back_period_s=4.0, upscale_delay_s=upscale_s, downscale_delay_s=downscale_s)
            else:
                auto.update(min_replicas=1, max_replicas=1)
    return config


class ReplicaSampler(threading.Thread):
    """worker-sd1's RUNNING replicas over time, from serve.status()."""

    def __init__(self, app_name: str):
        super().__init__(daemon=True)
        self.app_name, self.samples, self.stop_event = app_name, [], threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.stop_event.is_set():
            try:
                app = serve.status().applications.get(self.app_name)
                running = app.deployments[WORKER].replica_states.get("RUNNING", 0) if app else 0
                self.samples.append((time.monotonic(), running))
            except Exception:  # noqa: BLE001 - a missed sample is not a failure
                pass
            self.stop_event.wait(0.5)

    def first(self, after: float, predicate) -> float | None:  # noqa: ANN001
        return next((t for t, n in self.samples if t >= after and predicate(n)), None)


async def drive(url: str, token: str, users: list[str], load_s: float, steps: int) -> dict[str, Any]:
    """One client per user (so the per-user queue limit of the tier does not cap the load)."""
    out: dict[str, Any] = {"jobs": [], "http_429": 0, "errors": []}
    end = time.monotonic() + load_s

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n, user = 0, {"X-User-Id": users[i]}
        while time.monotonic() < end:
            body = {"prompt": f"a lighthouse at dusk {i}-{n}", "checkpoint": "tiny-sd1", "steps": steps,
                    "width": 64, "height": 64, "quantity": 1 + (n % 2), "seed": i * 10_000 + n}
            n += 1
            try:
                r = await http.post("/v1/generations", json=body, params={"wait": "true", "timeout": "120"},
                                    headers=user, timeout=180)
            except httpx.TransportError as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code == 429:
                out["http_429"] += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code not in (200, 202):
                out["errors"].append(f"{r.status_code}: {r.text[:200]}")
                continue
            out["jobs"].append({**r.json(), "_user": users[i]})

    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}) as http:
        await asyncio.gather(*(client(i, http) for i in range(len(users))))
        # anything not yet terminal (a wait that timed out) is followed to its end
        for k, job in enumerate(out["jobs"]):
            deadline = time.monotonic() + 120
            while job["status"] not in TERMINAL and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                job = {**(await http.get(f"/v1/generations/{job['id']}", headers={"X-User-Id": job["_user"]})).json(),
                       "_user": job["_user"]}
            out["jobs"][k] = job
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--load-s", type=float, default=40.0, help="how long the clients generate")
    parser.add_argument("--concurrency", type=int, default=6, help="clients (one user each), each with one request in flight")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image (sets the work per job)")
    parser.add_argument("--upscale-delay-s", type=float, default=2.0)
    parser.add_argument("--downscale-delay-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=90.0, help="how long to wait for the scale-down")
    parser.add_argument("--replica-cpus", type=float, default=0.25, help="Ray CPUs per replica (a small machine)")
    parser.add_argument("--models-dir", type=Path, default=None, help="reuse tiny models built here instead of building")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    args = parser.parse_args(argv)

    import genserve.app as genserve_app
    from genserve.billing.ledger import Ledger, user_account
    from genserve.core.db import Database

    original = genserve_app.load_serve_config
    genserve_app.load_serve_config = lambda path: autoscaling_overrides(original(path), args.upscale_delay_s,
                                                                        args.downscale_delay_s)
    tmp = tempfile.TemporaryDirectory(prefix="genserve-autoscale-")
    service = sampler = None
    try:
        settings = prepare_data_dir(Path(tmp.name) / "data", args.models_dir)
        service = LocalService(settings, args.replica_cpus)
        url = service.start(args.start_timeout_s)
        run = uuid.uuid4().hex[:8]
        users = [f"autoscale-{run}-{i}" for i in range(args.concurrency)]
        db = Database.from_settings(settings)
        for user in users:
            Ledger(db, settings.billing).grant(user_account(user), STARTING_BALANCE, f"bench-autoscale:{user}",
                                              reason="autoscale bench starting balance")
        db.dispose()
        sampler = ReplicaSampler(service.name)
        sampler.start()
        time.sleep(2)
        print(f"service at {url}; {args.concurrency} clients for {args.load_s:.0f} s, {args.steps} steps; "
              f"{WORKER} autoscales 1..2 (upscale {args.upscale_delay_s:.0f} s, downscale {args.downscale_delay_s:.0f} s)",
              flush=True)
        load_start = time.monotonic()
        result = asyncio.run(drive(url, settings.auth.service_token.get_secret_value(), users, args.load_s, args.steps))
        load_end = time.monotonic()
        down = None
        while time.monotonic() < load_end + args.settle_s:
            down = sampler.first(load_end, lambda n: n == 1) if sampler.first(load_start, lambda n: n >= 2) else None
            if down is not None and (sampler.samples[-1][1] == 1):
                break
            time.sleep(1)
        sampler.stop_event.set()
        db = Database.from_settings(settings)
        try:
            ledger = Ledger(db, settings.billing)
            verify = ledger.verify()
            held = sum(ledger.balance(user_account(user)).held for user in users)
        finally:
            db.dispose()
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        if service is not None:
            service.stop()
        tmp.cleanup()
        genserve_app.load_serve_config = original

    up = sampler.first(load_start, lambda n: n >= 2)
    jobs = result["jobs"]
    statuses = [j["status"] for j in jobs]
    images = sum(len(j.get("images", [])) for j in jobs)
    figures = {
        "requests": len(jobs) + result["http_429"] + len(result["errors"]),
        "jobs_accepted": len(jobs),
        "jobs_succeeded": statuses.count("succeeded"),
        "failed_jobs": sum(s in ("failed", "blocked", "canceled") for s in statuses),
        "lost_jobs": sum(s not in TERMINAL for s in statuses),
        "http_429": result["http_429"],
        "http_errors": len(result["errors"]),
        "images_delivered": images,
        "images_per_s": round(images / max(load_end - load_start, 1e-9), 2),
        "peak_replicas": max((n for _, n in sampler.samples), default=0),
        "scale_up_after_load_start_s": round(up - load_start, 1) if up is not None else None,
        "scale_down_after_load_end_s": round(down - load_end, 1) if down is not None else None,
        "final_replicas": sampler.samples[-1][1] if sampler.samples else 0,
        "ledger_ok": bool(verify.ok and held == 0),
        "load_s": round(load_end - load_start, 1),
    }
    print(f"{figures['jobs_accepted']} jobs accepted, {figures['jobs_succeeded']} succeeded, {figures['failed_jobs']} "
          f"failed, {figures['lost_jobs']} lost; {figures['http_429']} answered 429 (retried); "
          f"{figures['images_delivered']} images, {figures['images_per_s']} images/s")
    print(f"{WORKER}: 1 -> {figures['peak_replicas']} replicas {figures['scale_up_after_load_start_s']} s into the load, "
          f"back to {figures['final_replicas']} {figures['scale_down_after_load_end_s']} s after it; "
          f"ledger {'verifies' if figures['ledger_ok'] else 'DOES NOT verify'}")
    if result["errors"]:
        print("errors:", *result["errors"][:5], sep="\n  ")
    print(json.dumps(figures, sort_keys=True))
    ok = (figures["peak_replicas"] == 2 and figures["final_replicas"] == 1 and figures["lost_jobs"] == 0
          and figures["failed_jobs"] == 0 and figures["http_errors"] == 0 and figures["ledger_ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

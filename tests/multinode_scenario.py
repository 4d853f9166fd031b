"""The multi-node node-kill scenario, run as its own process by test_multinode.py (a Ray cluster of
several nodes on this machine cannot share a process with the session's local Ray).

Nodes: a head (ingress, the Ray Job server, no generation or training work) and two workers, each
able to host the sd1 generation worker and a training attempt. Generations are started, then the node
running the sd1 worker is killed mid-generation; a training is started and the node running its
attempt is killed once epoch 1 is checkpointed. Every accepted job must end (succeeded, or failed with
its hold released), the training must resume on the other node from its checkpoint and succeed, the
ledger must verify and nothing may be charged twice. Prints one JSON line of figures and exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import httpx
from training_support import job_pid  # run as a script: tests/ is first on the path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except httpx.TransportError:  # a call cut by the node loss itself: ask again, as a client would
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def main(root: Path, models: Path) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    from sqlalchemy import func, select
    from training_support import register_base_models_from, toy_zip

    from genserve.app import APP_NAME, build_app, load_serve_config
    from genserve.billing.ledger import Ledger, user_account
    from genserve.bootstrap import bootstrap
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings
    from genserve.generation.jobs import GenerationJob
    from training.deps import TrainingDeps
    from training.service import Submission, TrainingService

    data = root / "data"
    data.mkdir(parents=True)
    os.symlink(models, data / "models")
    dashboard_port, http_port = free_port(), free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 10}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
        # the job agent's default port is fixed (52365): another Ray on this host would leave us none
        "dashboard_agent_listen_port": free_port()})
    workers = [cluster.add_node(num_cpus=2, resources={"gen": 1, "trainer": 1}) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)

    settings = load_settings(env={"GENSERVE_DATA_DIR": str(data)}, overrides={
        "server": {"port": http_port},
        "worker": {"resource_cache_dir": str(root / "cache"), "cpu_threads": 1},
        "generation": {"heartbeat_interval_s": 1.0, "reaper_interval_s": 2.0, "stale_after_s": 10.0},
        "training": {"progress_interval_s": 0, "ray_job_address": f"http://127.0.0.1:{dashboard_port}",
                     "job_resources": {"trainer": 1}, "gpus_per_job": 0, "heartbeat_timeout_s": 30},
    })
    db = Database.from_settings(settings)
    db.migrate()
    store = object_store_from_settings(settings)
    bootstrap(settings, db, store, build_models=False)
    ledger = Ledger(db, settings.billing)

    config = load_serve_config(settings.config_path(settings.server.serve_config))
    for d in config["applications"][0]["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
        place = {"gen": 1} if d["name"] == "worker-sd1" else {"head": 1}
        d["ray_actor_options"] = {"num_cpus": 0, "resources": place}
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app(settings, config), name=APP_NAME, route_prefix="/")
    http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120)

    def node_of(actor_prefix: str) -> str:
        actors = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                  if a.class_name.startswith(actor_prefix)]
        return actors[0].node_id if actors else ""

    def worker_node(node_id: str):  # noqa: ANN202
        return next(n for n in workers if n.node_id == node_id)

    # ---- generations: kill the node of the sd1 worker while they run
    user = f"mn{uuid.uuid4().hex[:8]}"
    ledger.grant(user_account(user), 100_000, f"mn-grant:{user}")
    headers = {"Authorization": "Bearer local-service-token", "X-User-Id": user}
    body = {"prompt": "a red fox in the snow", "checkpoint": "tiny-sd1", "steps": 30, "seed": 1}
    accepted = []
    for i in range(4):
        r = http.post("/v1/generations", json={**body, "seed": i}, headers=headers)
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])
    wait_for(lambda: http.get(f"/v1/generations/{accepted[0]}", headers=headers).json()["status"] == "running",
             120, "a running generation")
    gen_node = worker_node(wait_for(lambda: node_of("ServeReplica:genserve:worker-sd1"), 60, "the sd1 replica"))
    cluster.remove_node(gen_node, allow_graceful=False)
    workers.remove(gen_node)
    ended = {}
    for job_id in accepted:
        ended[job_id] = wait_for(lambda j=job_id: (v := http.get(f"/v1/generations/{j}", headers=headers).json())[
            "status"] not in ("queued", "running") and v, 300, f"generation {job_id} to end")
    statuses = sorted(v["status"] for v in ended.values())
    assert set(statuses) <= {"succeeded", "failed"}, statuses
    assert "failed" in statuses, statuses  # the one running on the killed node
    charged = sum(v["charged"] for v in ended.values())
    assert all(v["charged"] == 0 for v in ended.values() if v["status"] == "failed")
    # Serve brings the worker back on the other node: a new generation succeeds
    after = wait_for(lambda: (v := http.post("/v1/generations?wait=true&timeout=60", json={**body, "steps": 3},
                                             headers=headers).json()).get("status") == "succeeded" and v,
                     240, "a generation after the node loss", interval_s=2)
    charged += after["charged"]
    # every job the user has, also one whose response a cut connection lost (its retry is another job)
    with db.session() as s:
        recorded = s.scalar(select(func.coalesce(func.sum(GenerationJob.charged), 0))
                            .where(GenerationJob.user_id == user))
    assert recorded >= charged
    balance = ledger.balance(user_account(user))
    assert (balance.posted, balance.held) == (100_000 - recorded, 0), (balance, recorded)

    # ---- training: kill the node of its attempt after epoch 1 is checkpointed
    deps = TrainingDeps.from_settings(settings, db)
    register_base_models_from(deps, models)
    ledger.grant(user_account("trainee"), 10_000, "mn-grant:trainee")
    trainings = TrainingService(deps)
    # a spare node for the resumed attempt (the other one stays busy with the sd1 worker)
    workers.append(cluster.add_node(num_cpus=2, resources={"trainer": 1}))
    row = trainings.submit("trainee", toy_zip(root / "toy.zip"), Submission("sd1", real_person=False, params={
        "epochs": 2, "repeats": 2, "batch_size": 2, "network_dim": 4, "network_alpha": 2, "seed": 21,
        "gradient_checkpointing": False}))
    wait_for(lambda: (r := deps.records.get(row.id)).checkpoint_epoch == 1 and r.step >= 5, 400, "epoch 2")
    pid = wait_for(lambda: job_pid(row.id), 10, "the attempt's process")
    os.kill(pid, signal.SIGSTOP)  # held mid-epoch while its node is found and killed
    # the attempt's process runs under its job's supervisor actor, on the node that has `trainer`
    supervisor = wait_for(lambda: [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                                   if a.class_name == "JobSupervisor" and row.ray_job_id in (a.name or "")],
                          60, "the training's supervisor")[0]
    train_node = worker_node(supervisor.node_id)
    frozen = deps.records.get(row.id)
    assert frozen.checkpoint_epoch == 1 and frozen.step < frozen.total_steps  # killed mid-epoch 2
    cluster.remove_node(train_node, allow_graceful=False)
    # a real node takes every process along; here the attempt runs in its own session, so it goes too
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    workers.remove(train_node)
    done = wait_for(lambda: (r := trainings.get(row.id, "trainee")).status in ("succeeded", "failed") and r, 600,
                    "the training to end", interval_s=1)
    assert done.status == "succeeded" and done.attempts >= 2, (done.status, done.error_code, done.error_message)
    assert (done.step, done.epoch) == (done.total_steps, 2)
    assert done.charged == done.quote_total
    tb = ledger.balance(user_account("trainee"))
    assert (tb.posted, tb.held) == (10_000 - done.charged, 0)
    report = ledger.verify()
    assert report.ok, report.problems
    figures = {"generations": len(accepted) + 1, "failed_on_node_loss": statuses.count("failed"),
               "training_attempts": done.attempts, "charged_generation": charged, "charged_training": done.charged}
    http.close()
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return figures


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))), flush=True)

"""A training as a real Ray Job: its process is killed mid-epoch (SIGKILL), the service sees the
dead attempt through Ray, relaunches it, and the resumed job ends with exactly the weights of an
uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from training_support import available, fund, job_pid, register_base_models, toy_zip, training_settings

from genserve.core.db import Database
from training.config import IntakeLimits
from training.deps import TrainingDeps
from training.export import kohya_state_dict
from training.intake import run_intake
from training.params import ResolvedParams
from training.ray_jobs import JobState
from training.service import Submission, TrainingService
from training.trainer import BaseModelRef, LoraTrainer

pytestmark = pytest.mark.ray

PARAMS = {"epochs": 2, "repeats": 3, "batch_size": 2, "network_dim": 4, "network_alpha": 2, "unet_lr": 1e-2,
          "lr_scheduler": "cosine", "gradient_checkpointing": False, "seed": 21}


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.02):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def require_job_agent(client, timeout_s: float = 45.0) -> None:  # noqa: ANN001 - JobSubmissionClient
    """Ray Jobs run through the node's dashboard agent, which listens on a fixed port (52365): a second
    Ray on the same host (another test session, a local `genserve serve`) leaves this one without it.
    Skip with the reason there, as the PostgreSQL tests do; in CI the host is ours and it must work."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                reason = f"this Ray has no job agent (is another Ray running on this host?): {exc}"
                if os.environ.get("CI"):
                    pytest.fail(reason)
                pytest.skip(reason)
            time.sleep(1.0)


def test_killed_ray_job_resumes_to_the_same_weights(tmp_path: Path, tiny_models, ray_session) -> None:
    settings = training_settings(tmp_path)
    db = Database.from_settings(settings)
    db.migrate()
    deps = TrainingDeps.from_settings(settings, db)
    register_base_models(deps, tiny_models)
    fund(deps, "alice", 1000)
    service = TrainingService(deps)  # Ray Jobs through the session's job server
    require_job_agent(service.launcher.client)
    dataset_zip = toy_zip(tmp_path / "toy.zip")

    row = service.submit("alice", dataset_zip, Submission("sd1", real_person=False, trigger_words=("tqz",),
                                                          params=PARAMS))
    assert (row.status, row.steps_per_epoch, row.total_steps) == ("queued", 6, 12)
    assert service.launcher.state("genserve-training-unknown-1") is JobState.missing
    first_attempt = row.ray_job_id

    # freeze the process once epoch 1 is checkpointed and epoch 2 has begun, check, then kill it
    wait_for(lambda: (r := deps.records.get(row.id)).checkpoint_epoch == 1 and r.step >= 7, 300, "epoch 2")
    pid = wait_for(lambda: job_pid(row.id), 10, "the job process")
    os.kill(pid, signal.SIGSTOP)
    frozen = deps.records.get(row.id)
    assert frozen.status == "running" and frozen.checkpoint_step == 6 and 6 < frozen.step < 12  # mid-epoch
    os.kill(pid, signal.SIGKILL)

    # Ray reports the attempt dead; reading the job reconciles it: a second attempt resumes from epoch 1
    resumed = wait_for(lambda: (r := service.get(row.id, "alice")).attempts == 2 and r, 120, "a relaunch",
                       interval_s=0.5)
    assert resumed.ray_job_id != first_attempt and resumed.status in ("queued", "running")
    done = wait_for(lambda: (r := service.get(row.id, "alice")).status in ("succeeded", "failed") and r, 300,
                    "the end of the job", interval_s=0.5)
    assert done.status == "succeeded", (done.error_code, done.error_message, service.launcher.logs(done.ray_job_id))
    assert (done.step, done.epoch, done.attempts) == (12, 2, 2)
    assert done.charged == done.quote_total and available(deps, "alice") == 1000 - done.quote_total
    _, stream = service.download(row.id, "alice")
    delivered = load(stream.read())

    # the same run, uninterrupted, in this process (one thread, as the Ray Job's entrypoint has)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_intake(dataset_zip, tmp_path / "ref-dataset", IntakeLimits())
        params = ResolvedParams.model_validate(done.params)
        reference = LoraTrainer(BaseModelRef("sd1", tiny_models["sd1"].diffusers_dir), tmp_path / "ref-dataset",
                                params, trigger_words=["tqz"], work_dir=tmp_path / "ref", device="cpu")
        assert reference.train().completed
    finally:
        torch.set_num_threads(threads)
    expected = kohya_state_dict(reference.adapter_state_dict(), "sd1", params.network_alpha)
    assert delivered.keys() == expected.keys()
    assert all(torch.equal(delivered[k], expected[k]) for k in expected)
    db.dispose()

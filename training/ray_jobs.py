"""Training runs as Ray Jobs: a separate process per attempt, with its own GPU on GPU clusters.

The Ray Job server lives in Ray's dashboard process, so a Ray started by the service must have the
dashboard on (`local_ray_init_kwargs`). Each attempt gets its own submission id; the job process
writes only while its attempt owns the row, so a relaunch fences off a stale process.
"""

from __future__ import annotations

import enum
import logging
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

from genserve.core.errors import Unavailable

if TYPE_CHECKING:
    from genserve.core.config import Settings

log = logging.getLogger(__name__)

ATTEMPT_ENV = "GENSERVE_TRAINING_ATTEMPT"
# a freshly started cluster answers "No available agent to submit job, please try again later" for a while
SUBMIT_RETRY_S = 60.0


class JobState(str, enum.Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    stopped = "stopped"
    missing = "missing"  # the job server does not know it (a restarted cluster)

    @property
    def ended(self) -> bool:
        return self not in (JobState.pending, JobState.running)


def local_ray_init_kwargs(settings: Settings) -> dict[str, Any]:
    """What `ray.init` needs so that training jobs can be submitted to a Ray started locally."""
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": settings.training.dashboard_port}


class RayJobLauncher:
    """Submits, watches and stops training attempts through `ray.job_submission.JobSubmissionClient`."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None

    @property
    def client(self):  # noqa: ANN201 - JobSubmissionClient, imported lazily (Ray is heavy)
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            address = self.settings.training.ray_job_address or self._connected_job_server()
            try:
                self._client = JobSubmissionClient(address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise Unavailable(f"the Ray Job server is not reachable: {exc}", code="ray_jobs_unavailable") from exc
        return self._client

    def _connected_job_server(self) -> str:
        """The job server of the Ray cluster this process belongs to (a Serve replica, a driver), else
        the dashboard port a locally started Ray uses."""
        import ray

        if ray.is_initialized():
            from ray._private.worker import get_dashboard_url  # what Ray's own job CLI resolves "auto" with

            url = get_dashboard_url()
            if url:
                return url if "://" in url else f"http://{url}"
        return f"http://127.0.0.1:{self.settings.training.dashboard_port}"

    def _gpus(self) -> float:
        wanted = self.settings.training.gpus_per_job
        if wanted != "auto":
            return float(wanted)
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    @staticmethod
    def submission_id(training_id: str, attempt: int) -> str:
        return f"genserve-training-{training_id}-{attempt}"

    def submit(self, training_id: str, attempt: int) -> None:
        """Start attempt `attempt` of a training: `python -m training.run TRAINING_ID` as a Ray Job."""
        sid = self.submission_id(training_id, attempt)
        python = self.settings.training.job_python or sys.executable
        env = {
            **self.settings.to_env(),
            ATTEMPT_ENV: sid,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        job = dict(
            entrypoint=f"{shlex.quote(python)} -m training.run {shlex.quote(training_id)}",
            submission_id=sid,
            runtime_env={"env_vars": env},
            entrypoint_num_cpus=1,
            entrypoint_num_gpus=self._gpus(),
            entrypoint_resources=dict(self.settings.training.job_resources) or None,
            metadata={"genserve_training_id": training_id, "attempt": str(attempt)},
        )
        deadline = time.monotonic() + SUBMIT_RETRY_S
        delay = 0.5
        while True:
            try:
                self.client.submit_job(**job)
                break
            except Unavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - the job server's errors are untyped (HTTP)
                text = str(exc)
                if "already exists" in text:  # an earlier try got through; the id makes this idempotent
                    break
                transient = "try again" in text or "status code 5" in text or isinstance(exc, ConnectionError)
                if not transient or time.monotonic() + delay > deadline:
                    raise Unavailable(f"cannot submit training {training_id}: {exc}",
                                      code="ray_job_submit_failed") from exc
                log.info("Ray Job server not ready (%s); retrying in %.1f s", text[:120], delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.info("submitted training %s as Ray Job %s", training_id, sid)

    def state(self, sid: str) -> JobState:
        try:
            status = self.client.get_job_status(sid)
        except (RuntimeError, ConnectionError) as exc:
            if "does not exist" in str(exc):  # HTTP 404 from the job server
                return JobState.missing
            raise Unavailable(f"cannot read Ray Job {sid}: {exc}", code="ray_jobs_unavailable") from exc
        return JobState(str(status.value).lower())

    def stop(self, sid: str) -> None:
        try:
            self.client.stop_job(sid)
        except RuntimeError as exc:
            log.warning("stopping Ray Job %s: %s", sid, exc)

    def logs(self, sid: str) -> str:
        return self.client.get_job_logs(sid)

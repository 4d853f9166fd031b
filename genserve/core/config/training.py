"""The `training:` section of the settings tree: how training jobs run here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainingConfig(BaseModel):
    """How training jobs run here (the `training:` section). Limits and defaults live in `training.yaml`."""

    model_config = ConfigDict(extra="forbid")

    config_file: str = Field("training.yaml", description="limits and parameter defaults, under the config dir")
    launcher: Literal["ray", "subprocess"] = Field(
        "ray", description="ray: a Ray Job per training; subprocess: a child process on this host"
    )
    # The Ray Job server lives in Ray's dashboard process: a locally started Ray must have it on.
    ray_job_address: str | None = Field(
        None, description="Ray Job server URL; None: the connected cluster's, else http://127.0.0.1:<dashboard_port>")
    dashboard_port: int = 8265
    gpus_per_job: float | Literal["auto"] = Field("auto", description="auto: 1 when the Ray cluster has GPUs")
    max_attempts: int = Field(3, ge=1, description="runs per job, counting resumes after a dead process")
    progress_interval_s: float = Field(1.0, ge=0, description="least time between progress writes")
    heartbeat_timeout_s: float = Field(300.0, gt=0, description="a running job silent this long is presumed dead")
    heartbeat_interval_s: float = Field(15.0, gt=0, description="how often a job process says it is alive")
    hold_ttl_s: int = Field(14 * 24 * 3600, gt=0, description="how long a training hold may stay open")
    work_dir: Path | None = Field(None, description="scratch space for datasets and checkpoints; default <data_dir>/training")
    model_cache_bytes: int = Field(64 << 30, gt=0, description="local copies of base checkpoints kept by training jobs")
    job_python: str | None = Field(None, description="interpreter of the job entrypoint; default: this process's")
    job_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each training job asks for, e.g. {training: 1} to land only on "
                    "the training worker group of a cluster",
    )

"""The trainings table and the `training:` settings section.

One row per LoRA training job: what was asked (params, dataset), what safety said, the money held,
where the Ray Job is, how far it got (step, epoch, loss, last checkpoint) and what it produced.
Step and epoch are written by the job itself, never inferred from files, so resume is exact.
"""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from genserve.db import Base


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


class TrainingStatus(str, enum.Enum):
    review = "review"  # the dataset was flagged; waits for a moderator with the hold kept
    queued = "queued"  # approved, waiting for its Ray Job to start
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    denied = "denied"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TrainingStatus.succeeded, TrainingStatus.failed, TrainingStatus.canceled, TrainingStatus.denied})


class Training(Base):
    __tablename__ = "trainings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    trigger_words: Mapped[list] = mapped_column(JSON, default=list)
    real_person: Mapped[bool] = mapped_column(Boolean, default=False)
    # dataset: the normalised images + captions the intake kept, stored as one archive
    dataset_key: Mapped[str] = mapped_column(String(512))
    dataset_images: Mapped[int] = mapped_column(Integer)
    intake_report: Mapped[dict] = mapped_column(JSON, default=dict)
    safety: Mapped[dict] = mapped_column(JSON, default=dict)
    # money (integer buzz)
    quote_total: Mapped[int] = mapped_column(BigInteger)
    quote: Mapped[dict] = mapped_column(JSON, default=dict)
    hold_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    charged: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # plan and progress, written by the job
    steps_per_epoch: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # written by the job process every few seconds, also while it loads models or uploads files
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    checkpoint_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    checkpoint_epoch: Mapped[int] = mapped_column(Integer, default=0)
    samples: Mapped[list] = mapped_column(JSON, default=list)
    # execution
    ray_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # outcome
    resource_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    output_key: Mapped[str | None] = mapped_column(String(512), nullable=True)
    output_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

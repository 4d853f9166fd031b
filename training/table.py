"""The trainings table.

One row per LoRA training job: what was asked (params, dataset), what safety said, the money held,
where the Ray Job is, how far it got (step, epoch, loss, last checkpoint) and what it produced.
Step and epoch are written by the job itself, never inferred from files, so resume is exact.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from genserve.core.db import Base


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
TERMINAL_VALUES = frozenset(status.value for status in TERMINAL_STATUSES)


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

"""The training service: submit, watch, cancel, moderate and download LoRA training jobs.

Submission order is what makes refusals free: intake and parameter checks, then the safety gate,
then the quote and the hold, then the row and the Ray Job. Anything refused before the hold costs
nothing and leaves nothing behind; anything that fails after it releases the hold.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
import tempfile
import threading
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from genserve.billing.economy import price_training
from genserve.billing.ledger import REVENUE_TRAINING, user_account
from genserve.core.errors import Conflict, InvalidRequest, SafetyBlocked
from safety.dataset_policy import DatasetPolicy
from safety.levels import NsfwLevel
from safety.verdict import Action
from training.captioning import Captioner
from training.deps import TrainingDeps
from training.intake import MANIFEST_NAME, IntakeReport, run_intake
from training.kohya_config import ALIASES, MappedConfig, map_options, parse_config
from training.params import check_trigger_words, parse_request, resolve
from training.ray_jobs import RayJobLauncher
from training.records import ACTIVE_STATUSES, TrainingNotFound, quote_to_dict, utcnow
from training.run import (
    DATASET_FILE,
    object_prefix,
)
from training.sample_prompts import parse_sample_prompts
from training.service_captions import CaptionSteps
from training.service_outputs import TrainingOutputs
from training.service_upkeep import TrainingUpkeep
from training.table import TERMINAL_VALUES, Training, TrainingStatus
from training.trainer import plan_steps

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Submission:
    """What a user sends besides the dataset."""

    family: str
    real_person: bool
    name: str = ""
    trigger_words: tuple[str, ...] = ()
    person: str = ""  # the real person's name, when `real_person`
    params: dict[str, Any] | None = None
    allowed_level: str = "PG13"  # the most mature sample images the user may see
    config: str | None = None  # a kohya `--config_file` TOML (its values under `params`' explicit ones)
    dataset_config: str | None = None  # a kohya dataset TOML
    captions: dict[str, str] | None = None  # upload file name -> caption: the user's edits, over the zip's
    auto_caption: bool = False  # caption the images that still have none with the configured captioner


class TrainingService(CaptionSteps, TrainingOutputs, TrainingUpkeep):
    def __init__(self, deps: TrainingDeps, launcher: RayJobLauncher | None = None):
        self.deps = deps
        self.records = deps.records
        self.launcher = launcher or RayJobLauncher(deps.settings)
        self.dataset_policy = DatasetPolicy(deps.safety.auditor, deps.scanner)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._captioner: Captioner | None = None
        self._captioner_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, db=None) -> TrainingService:  # noqa: ANN001
        return cls(TrainingDeps.from_settings(settings, db))

    # ------------------------------------------------------------------------------------ submit

    def save_upload(self, stream: BinaryIO) -> Path:
        """Copy an upload to a temporary file, refusing it past the size limit (`dataset_too_large`)."""
        limit = self.deps.limits.intake.max_upload_bytes
        folder = self.deps.work_dir / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix=".upload")
        size = 0
        with open(fd, "wb") as out:
            while chunk := stream.read(_COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    out.close()
                    Path(name).unlink(missing_ok=True)
                    raise InvalidRequest(f"the upload is larger than {limit} bytes", code="dataset_too_large")
                out.write(chunk)
        return Path(name)

    def submit(self, user_id: str, dataset: Path, sub: Submission) -> Training:
        """Intake + gate + quote + hold + launch. `dataset` is a zip file or a folder; it is not modified."""
        limits = self.deps.limits
        if sub.family not in limits.base_models:
            raise InvalidRequest(f"unknown model family {sub.family!r}; expected one of {sorted(limits.base_models)}",
                                 code="unknown_family")
        mapped = self.map_config(sub)
        request = parse_request(mapped.params)
        triggers = check_trigger_words(list(dict.fromkeys([*sub.trigger_words, *mapped.trigger_words])), limits)
        self._audit_sample_prompts(request.sample_prompts or [], user_id)
        if sub.real_person and not (sub.person or sub.name).strip():
            raise InvalidRequest("a real-person training needs the person's name", code="person_required")
        allowed = NsfwLevel.parse(sub.allowed_level).name
        # the base model's owner terms: a base model still in early access refuses users who did not
        # unlock it (403 `early_access`), before anything is read or held, as a generation does
        base = self.deps.economy.admit([limits.base_models[sub.family].checkpoint], user_id)
        training_id = uuid.uuid4().hex
        staging = Path(tempfile.mkdtemp(dir=self._scratch(), prefix=f"{training_id}."))
        try:
            report = run_intake(dataset, staging, limits.intake)
            report, signals = self._apply_captions(report, staging, sub)
            seed = uuid.uuid4().int % 2**31
            params = resolve(request, sub.family, limits, len(report.images), default_seed=seed)
            per_epoch, total = plan_steps(report.images, params)
            if request.max_train_steps and request.epochs is None:  # whole epochs covering the steps asked
                epochs = max(math.ceil(request.max_train_steps / max(per_epoch, 1)), 1)
                params = resolve(request.model_copy(update={"epochs": epochs}), sub.family, limits,
                                 len(report.images), default_seed=seed)
                per_epoch, total = plan_steps(report.images, params)
            if total > limits.limits.max_steps:
                raise InvalidRequest(f"this run needs {total} steps; at most {limits.limits.max_steps} are allowed",
                                     code="invalid_training_params", details={"field": "epochs", "steps": total})
            verdict = self.dataset_policy.check(staging, report, triggers, sub.real_person, signals)
            self.deps.audit.append("training_dataset", verdict.action.value, rules=verdict.rule_ids,
                                   job_id=training_id, user_id=user_id,
                                   details={"images": len(report.images), "mature": verdict.mature,
                                            "minor_signal": verdict.minor_signal, "real_person": sub.real_person})
            if verdict.action is Action.block:
                raise SafetyBlocked("the dataset cannot be trained on", code="dataset_blocked",
                                    details={"rules": verdict.rule_ids, "findings": verdict.to_dict()["findings"]})
            captioned = len(report.warnings.get("auto_captioned", []))
            quote = price_training(
                self.deps.pricing.quote_training(sub.family, total, params.epochs, captioned_images=captioned),
                payer=user_id, base=base[0] if base else None, config=self.deps.settings.billing.economy)
            return self._hold_and_create(training_id, user_id, sub, triggers, params, report, staging,
                                         verdict.to_dict(), allowed, quote, per_epoch, total, mapped.ignored)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------------------------ captions

    @staticmethod
    def map_config(sub: Submission) -> MappedConfig:
        """The submission's kohya config files and its `params` (kohya's names or ours; `params` win)."""
        explicit = map_options(dict(sub.params or {}))
        given = frozenset(sub.params or {}) | frozenset(k for k, v in ALIASES.items() if v in explicit.params)
        mapped = (parse_config(sub.config, sub.dataset_config, skip=given) if (sub.config or sub.dataset_config)
                  else MappedConfig())
        mapped.params.update(explicit.params)
        mapped.trigger_words.extend(explicit.trigger_words)
        mapped.ignored.update(explicit.ignored)
        return mapped

    def _audit_sample_prompts(self, lines: list[str], user_id: str) -> None:
        """The user's sample prompts (and negatives) pass the prompt audit as any generation prompt does;
        samples are checked again, image by image, when they are rendered."""
        for sp in parse_sample_prompts(lines, None, 0):
            verdict = self.deps.safety.auditor.audit(sp.prompt, sp.negative)
            if verdict.action is Action.block:
                self.deps.audit.append("training_sample_prompt", "block", rules=verdict.rule_ids,
                                       user_id=user_id, details={"prompt": sp.prompt[:200]})
                raise SafetyBlocked("a sample prompt is not allowed", code="sample_prompt_blocked",
                                    details={"rules": verdict.rule_ids, "prompt": sp.prompt[:200]})

    def _hold_and_create(self, training_id, user_id, sub, triggers, params, report: IntakeReport,  # noqa: ANN001
                         staging: Path, verdict: dict, allowed: str, quote, per_epoch: int, total: int,
                         ignored: dict[str, str] | None = None) -> Training:
        hold = self.deps.ledger.hold(user_account(user_id), quote.total, key=f"training:{training_id}:hold",
                                     destination=REVENUE_TRAINING, reason=f"training {training_id}",
                                     expires_at=self._hold_expiry())
        try:
            archive = staging / DATASET_FILE  # removed with the staging folder
            with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
                zf.write(staging / MANIFEST_NAME, MANIFEST_NAME)
                for image in report.images:
                    zf.write(staging / image.file, image.file)
            self.deps.store.put_file(f"{object_prefix(training_id)}/{DATASET_FILE}", archive,
                                     content_type="application/zip")
            review = verdict["action"] == Action.review.value
            row = self.records.insert(Training(
                id=training_id, user_id=user_id, name=sub.name or f"lora-{training_id[:8]}", family=sub.family,
                base_model=self.deps.limits.base_models[sub.family].checkpoint,
                status=(TrainingStatus.review if review else TrainingStatus.queued).value,
                params=params.model_dump(), trigger_words=triggers, real_person=sub.real_person,
                dataset_key=f"{object_prefix(training_id)}/{DATASET_FILE}", dataset_images=len(report.images),
                intake_report={**report.to_dict(), "config": {"ignored": dict(ignored or {})}},
                safety={"verdict": verdict, "allowed_level": allowed, "person": (sub.person or sub.name).strip()},
                quote_total=quote.total, quote=quote_to_dict(quote), hold_id=hold.id, steps_per_epoch=per_epoch,
                total_steps=total, epochs=params.epochs, step=0, epoch=0, checkpoint_step=0, checkpoint_epoch=0,
                samples=[], attempts=0, cancel_requested=False,
            ))
        except BaseException:
            self.deps.ledger.release(hold.id, key=f"training:{training_id}:release")
            raise
        if row.status == TrainingStatus.queued.value:
            row = self._launch(row)
        return row

    def _hold_expiry(self) -> dt.datetime:
        """When a training hold taken now expires: the training TTL, never past the ledger's cap."""
        ttl = min(self.deps.settings.training.hold_ttl_s, self.deps.settings.billing.max_hold_ttl_s)
        return utcnow() + dt.timedelta(seconds=ttl)

    def _scratch(self) -> Path:
        folder = self.deps.work_dir / "staging"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _launch(self, row: Training) -> Training:
        """Start the next attempt; a job that cannot be started is failed and refunded.

        The attempt is recorded before it is submitted, so the job process always finds itself the
        owner of the row; a submission that fails leaves a failed, refunded job."""
        attempt = row.attempts + 1
        sid = self.launcher.submission_id(row.id, attempt)
        row = self.records.transition(row.id, ACTIVE_STATUSES, TrainingStatus.queued.value,
                                      ray_job_id=sid, attempts=attempt)
        try:
            self.launcher.submit(row.id, attempt)
        except Exception as exc:
            self.records.transition(row.id, ACTIVE_STATUSES, TrainingStatus.failed.value,
                                    error_code=getattr(exc, "code", "training_launch_failed"), error_message=str(exc))
            self.records.settle(self.deps.ledger, row.id, self.deps.store)
            raise
        return row

    # ------------------------------------------------------------------------------------ read

    def get(self, training_id: str, user_id: str | None = None) -> Training:
        """The job (reconciled with Ray first). `user_id` limits it to its owner; None is a moderator."""
        row = self._owned(training_id, user_id)
        if row.status in ACTIVE_STATUSES or (row.status in TERMINAL_VALUES and row.charged is None):
            row = self.reconcile_one(row)
        return row

    def _owned(self, training_id: str, user_id: str | None) -> Training:
        row = self.records.get(training_id)
        if user_id is not None and row.user_id != user_id:
            raise TrainingNotFound(f"no training {training_id}")  # the same answer as for no job at all
        return row

    def list(self, *, statuses: Iterable[str] | None = None, user_id: str | None = None) -> list[Training]:
        return self.records.list(statuses=statuses, user_id=user_id)





    # ------------------------------------------------------------------------------------ change

    def cancel(self, training_id: str, user_id: str | None) -> Training:
        """Queued or in review: canceled now, nothing charged. Running: stops between two steps and
        pays for the steps run."""
        row = self._owned(training_id, user_id)
        if row.status in (TrainingStatus.review.value, TrainingStatus.queued.value):
            try:
                row = self.records.transition(row.id, [row.status], TrainingStatus.canceled.value,
                                              cancel_requested=True)
            except Conflict:
                return self.cancel(training_id, user_id)  # it just started running
            if row.ray_job_id:
                self.launcher.stop(row.ray_job_id)
            return self.records.settle(self.deps.ledger, row.id, self.deps.store)
        if row.status == TrainingStatus.running.value:
            self.records.set_fields(row.id, cancel_requested=True)
            return self.records.get(row.id)
        raise Conflict(f"training {training_id} is already {row.status}", code="training_finished")

    def approve(self, training_id: str, moderator: str = "moderator") -> Training:
        row = self.records.transition(training_id, [TrainingStatus.review.value], TrainingStatus.queued.value)
        self.deps.audit.append("training_dataset", "approve", job_id=training_id, user_id=row.user_id,
                               details={"moderator": moderator})
        return self._launch(row)

    def deny(self, training_id: str, moderator: str = "moderator", reason: str = "") -> Training:
        row = self.records.transition(training_id, [TrainingStatus.review.value], TrainingStatus.denied.value,
                                      error_code="dataset_denied", error_message=reason or "denied by a moderator")
        self.deps.audit.append("training_dataset", "deny", job_id=training_id, user_id=row.user_id,
                               details={"moderator": moderator, "reason": reason})
        return self.records.settle(self.deps.ledger, training_id, self.deps.store)

    # ------------------------------------------------------------------------------------ reconcile









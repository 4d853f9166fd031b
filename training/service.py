"""The training service: submit, watch, cancel, moderate and download LoRA training jobs.

Submission order is what makes refusals free: intake and parameter checks, then the safety gate,
then the quote and the hold, then the row and the Ray Job. Anything refused before the hold costs
nothing and leaves nothing behind; anything that fails after it releases the hold.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from genserve.billing.ledger import REVENUE_TRAINING, user_account
from genserve.core.errors import Conflict, InvalidRequest, NotFound, SafetyBlocked
from genserve.resources.models import Resource
from genserve.resources.registry import ResourceNotFound
from safety.dataset_policy import DatasetPolicy, TagSignal
from safety.levels import NsfwLevel
from safety.verdict import Action
from training.captioning import Caption, Captioner, CaptionerUnavailable, CaptionProposal, build_captioner
from training.deps import TrainingDeps
from training.intake import MANIFEST_NAME, IntakeReport, KeptImage, run_intake
from training.kohya_config import ALIASES, MappedConfig, map_options, parse_config
from training.params import check_trigger_words, parse_request, resolve
from training.ray_jobs import RayJobLauncher
from training.records import ACTIVE_STATUSES, TrainingNotFound, quote_to_dict, utcnow
from training.run import (
    DATASET_FILE,
    JobRunner,
    epoch_lora_key,
    epoch_lora_prefix,
    lora_resource_id,
    object_prefix,
)
from training.sample_prompts import parse_sample_prompts
from training.table import TERMINAL_STATUSES, Training, TrainingStatus
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


class TrainingService:
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
            quote = self.deps.pricing.quote_training(sub.family, total, params.epochs)
            return self._hold_and_create(training_id, user_id, sub, triggers, params, report, staging,
                                         verdict.to_dict(), allowed, quote, per_epoch, total, mapped.ignored)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # ------------------------------------------------------------------------------------ captions

    def captioner(self) -> Captioner:
        """The configured captioner, built once; `captioner_unavailable` when captioning is off."""
        with self._captioner_lock:
            if self._captioner is None:
                built = build_captioner(self.deps.limits.captioning, self.deps.settings.config_dir)
                if built is None:
                    raise CaptionerUnavailable("auto-captioning is not configured on this service")
                self._captioner = built
            return self._captioner

    def _caption_images(self, staging: Path, images: list[KeptImage]) -> list[Caption]:
        captioner = self.captioner()
        out = []
        for image in images:
            with Image.open(staging / image.file) as img:
                out.extend(captioner.caption([img.convert("RGB")]))
        return out

    def _tag_signal(self, image: KeptImage, caption: Caption) -> TagSignal:
        mature = caption.rating is not None and caption.rating in self.deps.limits.captioning.mature_ratings
        return TagSignal(image.name, caption.rating, mature, caption.minor_tags)

    def _apply_captions(self, report: IntakeReport, staging: Path,
                        sub: Submission) -> tuple[IntakeReport, list[TagSignal]]:
        """The user's edited captions over the zip's, then auto-captions for images still without one
        (trigger words are prepended at training time, as kohya does); the manifest is rewritten."""
        edits = dict(sub.captions or {})
        if not edits and not sub.auto_caption:
            return report, []
        names = {image.name for image in report.images}
        unknown = sorted(set(edits) - names)
        if unknown:
            raise InvalidRequest(f"captions for files not in the dataset: {unknown[:5]}", code="unknown_caption_file",
                                 details={"names": unknown})
        limit = self.deps.limits.intake.max_caption_bytes
        for name, text in edits.items():
            if not isinstance(text, str) or len(text.encode()) > limit:
                raise InvalidRequest(f"the caption of {name} is not text of at most {limit} bytes",
                                     code="invalid_caption", details={"name": name})
        images = [replace(i, caption=" ".join(edits[i.name].split()) or None) if i.name in edits else i
                  for i in report.images]
        signals: list[TagSignal] = []
        if sub.auto_caption:
            missing = [i for i in images if not i.caption]
            captions = dict(zip([i.name for i in missing], self._caption_images(staging, missing), strict=True))
            signals = [self._tag_signal(i, captions[i.name]) for i in missing]
            images = [replace(i, caption=captions[i.name].text or None) if i.name in captions else i for i in images]
            if missing:
                report.warnings.setdefault("auto_captioned", []).extend(i.name for i in missing)
        report.images = images
        report.warnings["uncaptioned"] = [i.name for i in images if not i.caption]
        if not report.warnings["uncaptioned"]:
            del report.warnings["uncaptioned"]
        (staging / MANIFEST_NAME).write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True))
        return report, signals

    def propose_captions(self, user_id: str, dataset: Path, *, overwrite: bool = False) -> dict[str, Any]:
        """Captions for review before a submit: the upload's own, and the captioner's for images without
        one (every image with `overwrite`), each with the prompt audit's verdict and the tagger's
        rating and age-related tags. Nothing is stored or charged; the user edits and submits them as
        `captions` (or in the zip)."""
        captioner = self.captioner()
        staging = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="captions."))
        try:
            report = run_intake(dataset, staging, self.deps.limits.intake)
            if len(report.images) > self.deps.limits.captioning.max_images:
                raise InvalidRequest(f"at most {self.deps.limits.captioning.max_images} images per captioning request",
                                     code="dataset_too_large")
            todo = [i for i in report.images if overwrite or not i.caption]
            generated = dict(zip([i.name for i in todo], self._caption_images(staging, todo), strict=True))
            proposals = []
            for image in report.images:
                made = generated.get(image.name)
                text = made.text if made else (image.caption or "")
                verdict = self.deps.safety.auditor.audit(text) if text else None
                proposals.append(CaptionProposal(
                    image.name, text, made.source if made else "user", made.tags if made else (),
                    made.rating if made else None, made.minor_tags if made else (),
                    {"action": verdict.action.value, "rules": verdict.rule_ids} if verdict else
                    {"action": "allow", "rules": []}).to_dict())
            self.deps.audit.append("training_captions", "propose", user_id=user_id,
                                   details={"images": len(proposals), "generated": len(generated),
                                            "captioner": captioner.kind})
            return {"captioner": captioner.kind, "images": proposals,
                    "skipped": [{"name": s.name, "reason": s.reason} for s in report.skipped]}
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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
        ttl = min(self.deps.settings.training.hold_ttl_s, self.deps.settings.billing.max_hold_ttl_s)
        hold = self.deps.ledger.hold(user_account(user_id), quote.total, key=f"training:{training_id}:hold",
                                     destination=REVENUE_TRAINING, reason=f"training {training_id}",
                                     expires_at=utcnow() + dt.timedelta(seconds=ttl))
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
        if row.status in ACTIVE_STATUSES or (row.status in _TERMINAL and row.charged is None):
            row = self.reconcile_one(row)
        return row

    def _owned(self, training_id: str, user_id: str | None) -> Training:
        row = self.records.get(training_id)
        if user_id is not None and row.user_id != user_id:
            raise TrainingNotFound(f"no training {training_id}")  # the same answer as for no job at all
        return row

    def list(self, *, statuses: Iterable[str] | None = None, user_id: str | None = None) -> list[Training]:
        return self.records.list(statuses=statuses, user_id=user_id)

    def epochs(self, training_id: str, user_id: str | None) -> list[dict[str, Any]]:
        """The epochs whose LoRA is kept, oldest first: [{epoch, bytes, sha256}]."""
        row = self._owned(training_id, user_id)
        out = []
        for key in self.deps.store.list(epoch_lora_prefix(row.id) + "/"):
            name = key.rsplit("/", 1)[-1]
            if not (name.startswith("epoch-") and name.endswith(".safetensors")):
                continue
            info = self.deps.store.head(key)
            out.append({"epoch": int(name[6:-12]), "bytes": info.size,
                        "sha256": (info.metadata or {}).get("sha256")})
        return sorted(out, key=lambda e: e["epoch"])

    def download(self, training_id: str, user_id: str | None, *, epoch: int | None = None) -> tuple[str, BinaryIO]:
        """(file name, stream) of the finished LoRA, or of epoch `epoch`'s; the owner may download them
        even when the LoRA is blocklisted."""
        row = self._owned(training_id, user_id)
        if epoch is not None:
            key = epoch_lora_key(row.id, epoch)
            if not self.deps.store.exists(key):
                raise NotFound(f"training {training_id} has no LoRA for epoch {epoch}", code="epoch_not_found")
            return f"{row.name}-{epoch:06d}.safetensors", self.deps.store.open_read(key)
        if row.status != TrainingStatus.succeeded.value or not row.output_key:
            raise Conflict(f"training {training_id} is {row.status}; there is nothing to download",
                           code="training_not_finished")
        return f"{row.name}.safetensors", self.deps.store.open_read(row.output_key)

    def publish_epoch(self, training_id: str, user_id: str | None, epoch: int) -> Resource:
        """Register epoch `epoch`'s LoRA of a finished job as its own LoRA resource (`lora-<id>-eNNNN`),
        the user's choice of epoch; like the final one it is enabled only in the transaction that puts a
        declared real person's LoRA on the likeness blocklist. Publishing again returns the same resource."""
        row = self._owned(training_id, user_id)
        if row.status != TrainingStatus.succeeded.value:
            raise Conflict(f"training {training_id} is {row.status}; only a finished one publishes an epoch",
                           code="training_not_finished")
        key = epoch_lora_key(row.id, epoch)
        if not self.deps.store.exists(key):
            raise NotFound(f"training {training_id} has no LoRA for epoch {epoch}", code="epoch_not_found")
        resource_id = f"{lora_resource_id(row.id)}-e{epoch:04d}"
        try:
            return self.deps.registry.get(resource_id)
        except ResourceNotFound:
            pass
        folder = Path(tempfile.mkdtemp(dir=self._scratch(), prefix=f"{row.id}.publish."))
        try:
            path = self.deps.store.download_file(key, folder / f"{resource_id}.safetensors")
            resource = self.deps.registry.publish(
                path, id=resource_id, kind="lora", family=row.family, name=f"{row.name} (epoch {epoch})",
                owner_user_id=row.user_id, poi=row.real_person, trigger_words=list(row.trigger_words),
                meta={"training_id": row.id, "epoch": epoch, "base_model": row.base_model}, generation_enabled=False)
            try:
                JobRunner(self.deps, row.id, row.ray_job_id or "").enable_resource(row, resource.id, path)
            except BaseException:
                self.deps.registry.disable(resource.id, f"publishing epoch {epoch} of training {row.id} failed")
                raise
            return self.deps.registry.get(resource.id)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sample(self, training_id: str, user_id: str | None, epoch: int, index: int) -> BinaryIO:
        row = self._owned(training_id, user_id)
        for entry in row.samples or []:
            if (entry["epoch"], entry["index"]) == (epoch, index):
                if not entry.get("delivered"):
                    raise SafetyBlocked("this sample image was withheld", code="sample_withheld",
                                        details={"rules": entry.get("rules", [])})
                return self.deps.store.open_read(entry["key"])
        raise NotFound(f"training {training_id} has no sample {epoch}/{index}", code="sample_not_found")

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

    def reconcile_one(self, row: Training) -> Training:
        """Bring the row in line with its Ray Job: settle finished jobs, resume or fail dead ones."""
        if row.status in _TERMINAL:
            return self.records.settle(self.deps.ledger, row.id, self.deps.store) if row.charged is None else row
        if not row.ray_job_id:
            return row
        state = self.launcher.state(row.ray_job_id)
        if not state.ended and not self._silent_too_long(row):
            return row
        fresh = self.records.get(row.id)
        if fresh.status in _TERMINAL or fresh.ray_job_id != row.ray_job_id:
            return self.reconcile_one(fresh) if fresh.status in _TERMINAL else fresh
        if not state.ended:
            log.warning("training %s: attempt %s silent too long; stopping it", row.id, row.ray_job_id)
            self.launcher.stop(row.ray_job_id)
        if fresh.cancel_requested:
            done = self.records.transition(row.id, ACTIVE_STATUSES, TrainingStatus.canceled.value)
            return self.records.settle(self.deps.ledger, done.id, self.deps.store)
        if fresh.attempts < self.deps.settings.training.max_attempts:
            log.warning("training %s: attempt %s ended (%s) without finishing; resuming from epoch %d",
                        row.id, row.ray_job_id, state.value, fresh.checkpoint_epoch)
            queued = self.records.transition(row.id, ACTIVE_STATUSES, TrainingStatus.queued.value,
                                             step=fresh.checkpoint_step, epoch=fresh.checkpoint_epoch)
            return self._launch(queued)
        done = self.records.transition(
            row.id, ACTIVE_STATUSES, TrainingStatus.failed.value, error_code="training_process_died",
            error_message=f"the training process ended ({state.value}) {fresh.attempts} times without finishing")
        return self.records.settle(self.deps.ledger, done.id, self.deps.store)

    def _silent_too_long(self, row: Training) -> bool:
        last = row.heartbeat_at or row.started_at
        if row.status != TrainingStatus.running.value or last is None:
            return False
        if last.tzinfo is None:
            last = last.replace(tzinfo=dt.timezone.utc)
        return (utcnow() - last).total_seconds() > self.deps.settings.training.heartbeat_timeout_s

    def reconcile(self) -> int:
        """One pass over every active or unsettled job; returns how many changed."""
        changed = 0
        for row in self.records.list(statuses=ACTIVE_STATUSES, limit=10_000) + self.records.unsettled():
            try:
                after = self.reconcile_one(row)
            except Exception:  # noqa: BLE001 - one job's trouble must not stop the pass
                log.exception("reconciling training %s", row.id)
                continue
            changed += (after.status, after.ray_job_id, after.charged) != (row.status, row.ray_job_id, row.charged)
        return changed

    def purge_epoch_loras(self, now: dt.datetime | None = None) -> int:
        """Delete the per-epoch LoRAs of jobs finished longer ago than the retention period (published
        epochs are resources of their own and stay); returns how many files went."""
        days = self.deps.limits.retention.epoch_loras_days
        cutoff = (now or utcnow()) - dt.timedelta(days=days)
        deleted = 0
        for row in self.records.finished_before(cutoff):
            for key in list(self.deps.store.list(epoch_lora_prefix(row.id) + "/")):
                self.deps.store.delete(key)
                deleted += 1
        return deleted

    def start_background(self, interval_s: float = 10.0, purge_interval_s: float = 3600.0) -> None:
        """Reconcile every `interval_s` (and purge expired epoch LoRAs every `purge_interval_s`) in a
        daemon thread until `close()`."""
        if self._thread is not None:
            return

        def loop() -> None:
            last_purge = 0.0
            while not self._stop.wait(interval_s):
                self.reconcile()
                if time.monotonic() - last_purge >= purge_interval_s:
                    last_purge = time.monotonic()
                    try:
                        self.purge_epoch_loras()
                    except Exception:  # noqa: BLE001 - retried on the next pass
                        log.exception("purging expired epoch LoRAs")

        self._thread = threading.Thread(target=loop, name="training-reconciler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


_TERMINAL = {s.value for s in TERMINAL_STATUSES}

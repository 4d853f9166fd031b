"""The Ray Job entrypoint: `python -m training.run TRAINING_ID`.

One process runs one attempt of one training: it claims the row, fetches the dataset and the base
checkpoint, resumes from the last epoch checkpoint if there is one, trains with progress and
cancellation through the database, uploads a checkpoint every epoch, renders samples through the
generator's safety path, exports and verifies the kohya file, registers it, and settles the hold.

A failure here is the service's: the job is failed and the hold released in full. A process that
dies without getting that far is found by the service's reconciler and resumed or failed there.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

from safetensors.torch import load_file

from genserve.core.config import load_settings
from genserve.core.errors import GenserveError
from genserve.core.log import configure_logging, log_context
from genserve.core.storage.base import sha256_file
from genserve.resources.cache import ResourceCache
from genserve.resources.catalog import load_model_catalog
from safety.embeddings import SafetyEmbeddings
from safety.levels import NsfwLevel
from safety.policy import ResourceFlags
from training.checkpoint import FILES as CHECKPOINT_FILES
from training.deps import TrainingDeps
from training.export import ExportInfo, verify_export, write_lora
from training.params import ResolvedParams
from training.ray_jobs import ATTEMPT_ENV
from training.records import Superseded, utcnow
from training.table import Training, TrainingStatus
from training.trainer import BaseModelRef, LoraTrainer, Progress, TrainHooks

log = logging.getLogger("training.run")

DATASET_FILE = "dataset.zip"


def object_prefix(training_id: str) -> str:
    return f"trainings/{training_id}"


def checkpoint_prefix(training_id: str, epoch: int) -> str:
    return f"{object_prefix(training_id)}/checkpoints/epoch-{epoch:06d}"


def epoch_lora_prefix(training_id: str) -> str:
    return f"{object_prefix(training_id)}/epochs"


def epoch_lora_key(training_id: str, epoch: int) -> str:
    """Where epoch `epoch`'s LoRA (kohya format) is kept for download."""
    return f"{epoch_lora_prefix(training_id)}/epoch-{epoch:06d}.safetensors"


def lora_resource_id(training_id: str) -> str:
    return f"lora-{training_id}"


class JobRunner:
    def __init__(self, deps: TrainingDeps, training_id: str, attempt: str):
        self.deps = deps
        self.id = training_id
        self.attempt = attempt
        self.records = deps.records
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False
        self._epoch_lora = None

    # ------------------------------------------------------------------------------------ plumbing

    def _write(self, **fields) -> None:
        self.records.fenced_update(self.id, self.attempt, **fields)

    def _fetch_base(self, row: Training, cache_dir: Path) -> BaseModelRef:
        resource = self.deps.registry.get(row.base_model)
        cache = ResourceCache(self.deps.store, cache_dir, self.deps.settings.training.model_cache_bytes)
        fmt = "folder" if resource.format == "diffusers" else "file"
        path = cache.fetch(resource.storage_key, resource.sha256, fmt)
        config_dir = None
        if config := (resource.meta or {}).get("config"):
            config_dir = cache.fetch(config["storage_key"], config["sha256"], "folder")
        return BaseModelRef(row.family, path, resource.format, config_dir)

    def _fetch_dataset(self, dest: Path) -> Path:
        data = self.deps.store.get_bytes(f"{object_prefix(self.id)}/{DATASET_FILE}")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            zf.extractall(dest)  # our own archive of normalised PNGs (names we chose)
        return dest

    def _fetch_checkpoint(self, row: Training, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        for name in CHECKPOINT_FILES:
            self.deps.store.download_file(f"{row.checkpoint_key}/{name}", dest / name)
        return dest

    # ------------------------------------------------------------------------------------ hooks

    def _on_progress(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last_write >= self.deps.settings.training.progress_interval_s:
            self._last_write = now
            self._write(step=p.step, epoch=p.epoch, loss=p.loss, eta_s=p.eta_s, progress_at=utcnow())

    def _should_stop(self) -> bool:
        now = time.monotonic()
        if now - self._last_cancel_check >= min(self.deps.settings.training.progress_interval_s, 1.0):
            self._last_cancel_check = now
            self._cancel = self.records.cancel_requested(self.id)
        return self._cancel

    def _export_info(self, row: Training, params: ResolvedParams, step: int, epoch: int) -> ExportInfo:
        return ExportInfo(
            family=row.family, base_model=row.base_model, network_dim=params.network_dim,
            network_alpha=params.network_alpha, trigger_words=list(row.trigger_words), steps=step, epochs=epoch,
            resolution=params.resolution, num_images=row.dataset_images, title=row.name,
            network_type=params.network_type, conv_dim=params.conv_dim, conv_alpha=params.conv_alpha)

    def _on_checkpoint(self, folder: Path, step: int, epoch: int) -> None:
        prefix = checkpoint_prefix(self.id, epoch)
        if self._epoch_lora is not None:
            self._epoch_lora(folder, step, epoch)
        for name in CHECKPOINT_FILES:  # state.json last: a listed checkpoint is complete
            self.deps.store.put_file(f"{prefix}/{name}", folder / name)
        self._write(checkpoint_key=prefix, checkpoint_step=step, checkpoint_epoch=epoch, step=step, epoch=epoch,
                    progress_at=utcnow())

    def enable_resource(self, row: Training, resource_id: str, path: Path) -> None:
        """Enable the trained LoRA; a declared real person's goes on the blocklist in the same transaction
        (the owner may still download it; the generator will never load it)."""
        blocklist = self.deps.blocklist
        prepared = blocklist.prepare(path) if row.real_person else None
        with self.deps.db.transaction() as s:
            if prepared is not None:
                entry = blocklist.insert(s, prepared, person=row.safety.get("person") or row.name,
                                         reason="real-person LoRA trained on this service (declared by its owner)",
                                         source=f"training:{self.id}", created_by="training", resource_id=resource_id)
                self.deps.audit.append("likeness", "add", subject=[entry.sha256], user_id="training", session=s,
                                       details={"entry_id": entry.id, "person": entry.person,
                                                "source": f"training:{self.id}", "resource_id": resource_id})
            self.deps.registry.enable(resource_id, session=s)

    def _epoch_lora_hook(self, row: Training, params: ResolvedParams, trainer: LoraTrainer):  # noqa: ANN202
        """Every `save_every_n_epochs` epochs (and the last), the LoRA as it is then, in kohya format,
        kept for download by epoch; uploaded before the checkpoint, so a resumed job never lacks one."""

        def export(folder: Path, step: int, epoch: int) -> None:
            if not trainer.epoch_lora_due(epoch):
                return
            adapter = load_file(str(folder / CHECKPOINT_FILES[0]))
            path = write_lora(folder.parent / f"epoch-{epoch:06d}.safetensors", adapter,
                              self._export_info(row, params, step, epoch))
            self.deps.store.put_file(epoch_lora_key(self.id, epoch), path, content_type="application/octet-stream",
                                     metadata={"sha256": sha256_file(path), "step": str(step)})
            path.unlink(missing_ok=True)

        return export

    def _sample_hook(self, row: Training):  # noqa: ANN202
        """Samples pass the generator's checks: prompt precheck, image scan, then the postcheck."""
        allowed = NsfwLevel.parse(row.safety.get("allowed_level", "PG13"))
        flags = [ResourceFlags(lora_resource_id(self.id), poi=row.real_person)]
        samples = list(row.samples or [])

        def on_sample(epoch: int, index: int, prompt: str, image) -> None:  # noqa: ANN001 - PIL image
            precheck = self.deps.safety.policy.precheck(prompt, "", flags, [], allowed)
            judged = self.deps.safety.judge_image(self.deps.scanner.scan(image), precheck, allowed,
                                                  kind="training_sample", job_id=self.id, user_id=row.user_id,
                                                  details={"epoch": epoch, "index": index})
            entry = {"epoch": epoch, "index": index, "level": judged.level.name, "delivered": judged.deliver}
            if judged.deliver:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                key = f"{object_prefix(self.id)}/samples/epoch-{epoch:06d}-{index}.png"
                self.deps.store.put_bytes(key, buf.getvalue(), content_type="image/png")
                entry["key"] = key
            else:
                entry["rules"] = list(judged.reasons)
            samples[:] = [s for s in samples if (s["epoch"], s["index"]) != (epoch, index)] + [entry]
            self._write(samples=list(samples))

        return on_sample

    # ------------------------------------------------------------------------------------ the run

    def run(self) -> int:
        row = self.records.get(self.id)
        if row.status not in (TrainingStatus.queued.value, TrainingStatus.running.value) or row.ray_job_id != self.attempt:
            log.info("training %s is %s (attempt %s); nothing to do", self.id, row.status, row.ray_job_id)
            return 0
        self.records.transition(self.id, [row.status], TrainingStatus.running.value, started_at=row.started_at or utcnow(),
                                step=row.checkpoint_step, epoch=row.checkpoint_epoch)
        work = self.deps.work_dir / "jobs" / self.id / self.attempt
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(beating,), name="training-heartbeat", daemon=True)
        heart.start()
        try:
            return self._train(row, work)
        except Superseded:
            log.warning("training %s: attempt %s was superseded; stopping", self.id, self.attempt)
            return 0
        except Exception as exc:  # noqa: BLE001 - any failure here is the service's: refund in full
            code = exc.code if isinstance(exc, GenserveError) else "training_failed"
            log.exception("training %s failed", self.id)
            try:
                self.records.transition(self.id, [TrainingStatus.running.value], TrainingStatus.failed.value,
                                        error_code=code, error_message=f"{type(exc).__name__}: {exc}"[:2000])
                self.records.settle(self.deps.ledger, self.id, self.deps.store)
            except GenserveError:
                log.exception("training %s: could not record the failure", self.id)
            return 1
        finally:
            beating.set()
            heart.join(timeout=5)
            shutil.rmtree(work, ignore_errors=True)

    def _heartbeat(self, stop: threading.Event) -> None:
        """Say "alive" while the main thread loads models, trains, renders or uploads."""
        interval = self.deps.settings.training.heartbeat_interval_s
        while True:
            try:
                self._write(heartbeat_at=utcnow())
            except Superseded:
                return  # the main thread finds out on its next write
            except Exception:  # noqa: BLE001 - a missed beat is retried; the reconciler is patient
                log.warning("training %s: heartbeat not written", self.id, exc_info=True)
            if stop.wait(interval):
                return

    def _safety_embeddings(self, family: str) -> SafetyEmbeddings:
        """The family's mandatory embeddings, exactly as the generator's workers load them."""
        settings = self.deps.settings
        entry = load_model_catalog(settings.models_file).family(family)
        return SafetyEmbeddings.from_config(family, entry.safety_embeddings_config(), settings.models_dir)

    def _train(self, row: Training, work: Path) -> int:
        params = ResolvedParams.model_validate(row.params)
        dataset = self._fetch_dataset(work / "dataset")
        base = self._fetch_base(row, self.deps.work_dir / "models")
        trainer = LoraTrainer(base, dataset, params, trigger_words=row.trigger_words, work_dir=work,
                              samples=self.deps.limits.samples, safety=self._safety_embeddings(base.family))
        if row.checkpoint_key:
            trainer.resume(self._fetch_checkpoint(row, work / "resume"))
            if (trainer.step, trainer.epoch) != (row.checkpoint_step, row.checkpoint_epoch):
                raise RuntimeError(f"checkpoint {row.checkpoint_key} holds step {trainer.step}, epoch {trainer.epoch}; "
                                   f"the job recorded {row.checkpoint_step}, {row.checkpoint_epoch}")
            log.info("training %s resumed at step %d, epoch %d", self.id, trainer.step, trainer.epoch)
        self._epoch_lora = self._epoch_lora_hook(row, params, trainer)
        hooks = TrainHooks(on_progress=self._on_progress, should_stop=self._should_stop,
                           on_checkpoint=self._on_checkpoint, on_sample=self._sample_hook(row))
        result = trainer.train(hooks)
        self._write(step=result.step, epoch=result.epoch, progress_at=utcnow(), eta_s=0.0 if result.completed else None)
        if not result.completed:
            self.records.transition(self.id, [TrainingStatus.running.value], TrainingStatus.canceled.value)
            self.records.settle(self.deps.ledger, self.id, self.deps.store)
            log.info("training %s canceled at step %d", self.id, result.step)
            return 0

        path = write_lora(work / f"{lora_resource_id(self.id)}.safetensors", trainer.adapter_state_dict(),
                          self._export_info(row, params, result.step, result.epoch))
        verify_export(trainer.pipe, path, row.family, prompt=", ".join(row.trigger_words) or "a photo",
                      resolution=params.resolution)
        # registered out of generation, and enabled only in the transaction that also commits its blocklist
        # entry (a real person): no moment exists, and no failure leaves one, where the LoRA is usable unlisted
        resource = self.deps.registry.publish(
            path, id=lora_resource_id(self.id), kind="lora", family=row.family, name=row.name,
            owner_user_id=row.user_id, poi=row.real_person, trigger_words=list(row.trigger_words),
            meta={"training_id": self.id, "base_model": row.base_model}, generation_enabled=False)
        try:
            self.enable_resource(row, resource.id, path)
            self.records.transition(self.id, [TrainingStatus.running.value], TrainingStatus.succeeded.value,
                                    resource_id=resource.id, output_key=resource.storage_key,
                                    output_sha256=resource.sha256)
        except BaseException:
            self.deps.registry.disable(resource.id, f"training {self.id} did not finish")
            raise
        self.records.settle(self.deps.ledger, self.id, self.deps.store)
        log.info("training %s succeeded: %s", self.id, resource.id)
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m training.run TRAINING_ID", file=sys.stderr)
        return 2
    training_id = argv[0]
    settings = load_settings()
    configure_logging(settings.logging.level, settings.logging.json_lines)
    attempt = os.environ.get(ATTEMPT_ENV, "")
    with log_context(job_id=training_id):
        deps = TrainingDeps.from_settings(settings)
        return JobRunner(deps, training_id, attempt).run()


if __name__ == "__main__":
    sys.exit(main())

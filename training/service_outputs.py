"""What a training produces, for its owner: epochs, downloads, publishing an epoch, samples."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from genserve.core.errors import Conflict, NotFound, SafetyBlocked
from genserve.resources.models import Resource
from genserve.resources.registry import ResourceNotFound
from training.records import utcnow
from training.run import (
    JobRunner,
    epoch_lora_key,
    epoch_lora_prefix,
    lora_resource_id,
)
from training.table import TrainingStatus


class TrainingOutputs:
    """`TrainingService`'s outputs for their owner: epochs, downloads, a published epoch, samples."""

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

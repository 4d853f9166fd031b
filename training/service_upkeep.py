"""Training upkeep: reconciling jobs with their Ray Jobs, the background loop, closing."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

from training.records import ACTIVE_STATUSES, utcnow
from training.table import TERMINAL_VALUES, Training, TrainingStatus

log = logging.getLogger(__name__)


class TrainingUpkeep:
    """`TrainingService`'s upkeep: jobs reconciled with their Ray Jobs, the background loop, closing."""

    def reconcile_one(self, row: Training) -> Training:
        """Bring the row in line with its Ray Job: settle finished jobs, resume or fail dead ones."""
        if row.status in TERMINAL_VALUES:
            return self.records.settle(self.deps.ledger, row.id, self.deps.store) if row.charged is None else row
        if not row.ray_job_id:
            return row
        state = self.launcher.state(row.ray_job_id)
        if not state.ended and not self._silent_too_long(row):
            return row
        fresh = self.records.get(row.id)
        if fresh.status in TERMINAL_VALUES or fresh.ray_job_id != row.ray_job_id:
            return self.reconcile_one(fresh) if fresh.status in TERMINAL_VALUES else fresh
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

"""Settlement: how a generation ends, and what it costs. Every exit after the hold settles it once.

- `deliver`: judge each image (audited), list the stored ones that pass, capture for those alone;
- `settle_without_images`: canceled, blocked or failed; the whole hold is released.

The job row's conditional transitions decide who settles when the runner and the reaper race; the
billing keys below are shared with the reaper, so a hold is released under one idempotency key
whoever gets there first.
"""

from __future__ import annotations

import datetime as dt
import logging

from genserve.billing.ledger import Ledger
from genserve.core import metrics
from genserve.core.errors import GenserveError
from genserve.engine.infotext import read_infotext_text
from genserve.generation.admission import AdmissionPlan
from genserve.generation.jobs import JobStatus, JobStore
from genserve.generation.staging import ImageStaging
from genserve.generation.worker.wire import WorkerResult
from safety.gate import SafetyGate

logger = logging.getLogger(__name__)


def hold_key(job_id: str) -> str:
    return f"gen:{job_id}:hold"


def capture_key(job_id: str) -> str:
    return f"gen:{job_id}:capture"


def release_key(job_id: str) -> str:
    return f"gen:{job_id}:release"


class Settlement:
    def __init__(self, *, jobs: JobStore, ledger: Ledger, safety: SafetyGate, staging: ImageStaging, owner: str):
        self.jobs = jobs
        self.ledger = ledger
        self.safety = safety
        self.staging = staging
        self.owner = owner

    def release(self, job_id: str, hold_id: str | None) -> None:
        if hold_id:
            try:
                self.ledger.release(hold_id, release_key(job_id))
            except GenserveError as exc:  # already closed (the reaper or the expiry got there first)
                logger.info("hold %s of %s not released: %s", hold_id, job_id, exc.code)

    def settle_without_images(self, job_id: str, status: JobStatus, error: tuple[str, str],
                              result: dict | None = None) -> bool:
        job = self.jobs.get(job_id)
        if not self.jobs.finish(job_id, status, owner=self.owner, error=error, result=result):
            return False
        self.release(job_id, job.hold_id)
        metrics.inc("genserve_jobs_total", family=job.family, status=status.value)
        return True

    def fail(self, job_id: str, code: str, message: str) -> bool:
        return self.settle_without_images(job_id, JobStatus.failed, (code, message))

    def cancel(self, job_id: str) -> bool:
        return self.settle_without_images(job_id, JobStatus.canceled, ("canceled", "the generation was canceled"))

    def worker_refused(self, job_id: str, plan: AdmissionPlan, exc: Exception) -> None:
        """The worker's own checks (defence in depth) refused a resource: blocked, nothing charged."""
        code = getattr(exc, "code", "safety_blocked")
        details = getattr(exc, "details", {}) or {}
        rules = details.get("rules") or [code]
        self.safety.audit.append("worker_refusal", "block", rules=rules, job_id=job_id, user_id=plan.caller.user_id,
                                 request_id=plan.caller.request_id, details={"message": str(exc)})
        self.settle_without_images(job_id, JobStatus.blocked, (code, str(getattr(exc, "message", exc))),
                                   result={"images": [], "withheld": [], "rules": rules})

    def deliver(self, job_id: str, plan: AdmissionPlan, hold_id: str, created_at: dt.datetime,
                result: WorkerResult) -> None:
        """Judge each image, list the stored ones that pass, capture, finish. An image stays staged
        (and is deleted with the job's leftovers) unless the finished job lists it."""
        staged = self.staging.staged(job_id)
        images, withheld = [], []
        for image in sorted(result.images, key=lambda i: i.index):
            stage = staged.get(image.index)
            withheld_because = image.failure or ("image_missing" if stage is None else
                                                 (None if image.deliverable else "scan_failed"))
            judged = self.safety.judge_image(
                image.scan.to_scan_result(), plan.verdict, plan.allowed, withheld_because=withheld_because,
                subject=stage.digest if stage else None, job_id=job_id, user_id=plan.caller.user_id,
                request_id=plan.caller.request_id, details={"index": image.index, "seed": image.seed},
            )
            deliver, reasons, level = judged.deliver, list(judged.reasons), judged.level.to_wire()
            if deliver:
                try:
                    stage.stored.result()
                except GenserveError as exc:
                    logger.error("storing %s failed: %s", stage.key, exc)
                    withheld.append({"index": image.index, "seed": image.seed, "nsfw_level": level,
                                     "reasons": ["storage_failed"]})
                    continue
                images.append({"index": image.index, "seed": image.seed, "key": stage.key, "nsfw_level": level,
                               "sha256": stage.digest})
            else:
                metrics.inc("genserve_images_withheld_total", value=1, rule=reasons[0])
                withheld.append({"index": image.index, "seed": image.seed, "nsfw_level": level, "reasons": reasons})
        # a face fix is held for its most faces per image; the delivered images pay for the passes they ran
        delivered = {i["index"] for i in images}
        passes = (sum(image.face_passes for image in result.images if image.index in delivered)
                  if plan.request.face_fix else None)
        charge = plan.quote.for_delivered(len(images), passes)
        status = JobStatus.succeeded if images else JobStatus.blocked
        body = {
            "images": images, "withheld": withheld,
            "infotext": _infotext(staged[images[0]["index"]].png) if images else None,
            "final_prompt": result.final_prompt, "final_negative_prompt": result.final_negative_prompt,
            "model_hash": result.model_hash, "lora_hashes": result.lora_hashes, "timings_ms": result.timings_ms,
        }
        try:
            # each party (platform, resource owners, tips) is paid for the delivered images only
            self.ledger.capture(hold_id, charge, capture_key(job_id), legs=plan.quote.legs_for_delivered(len(images), passes))
        except GenserveError as exc:
            logger.error("capture for %s failed: %s", job_id, exc.code)
            self.fail(job_id, "billing_failed", f"the charge could not be settled: {exc.code}")
            return
        listed = {i["index"]: stage for i in images if (stage := self.staging.take(job_id, i["index"])) is not None}
        error = None if images else ("all_images_withheld", "every image was withheld by the safety policy")
        if not self.jobs.finish(job_id, status, owner=self.owner, result=body, charged=charge, error=error):
            logger.error("generation %s was finished by someone else after its capture", job_id)
            self.staging.discard(job_id, listed)
        metrics.inc("genserve_jobs_total", family=plan.family, status=status.value)
        metrics.inc("genserve_images_generated_total", value=len(result.images), family=plan.family)
        _record_latencies(plan.family, created_at, result)


def _record_latencies(family: str, created_at: dt.datetime, result: WorkerResult) -> None:
    """Stage latencies the worker measured, and the job's end-to-end time."""
    timings = result.timings_ms
    for stage, key in (("queue", "queue_ms"), ("diffusion", "generate_ms"), ("scan", "scan_ms")):
        if key in timings:
            metrics.observe("genserve_stage_latency_ms", timings[key], stage=stage, family=family)
    created = created_at if created_at.tzinfo else created_at.replace(tzinfo=dt.timezone.utc)
    elapsed_ms = (dt.datetime.now(dt.timezone.utc) - created).total_seconds() * 1000
    metrics.observe("genserve_request_latency_ms", elapsed_ms, family=family)


def _infotext(data: bytes) -> str | None:
    """The A1111 infotext the worker wrote into the image (PNG text chunk, JPEG/WebP EXIF UserComment)."""
    return read_infotext_text(data)

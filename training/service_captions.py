"""Auto-captioning in the training flow: proposed captions, tags fed to the dataset policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.service import Submission

import contextlib
import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from genserve.billing.ledger import REVENUE_TRAINING, user_account
from genserve.core.errors import InvalidRequest
from safety.dataset_policy import TagSignal
from training.captioning import Caption, Captioner, CaptionerUnavailable, CaptionProposal, build_captioner
from training.intake import MANIFEST_NAME, IntakeReport, KeptImage, run_intake


class CaptionSteps:
    """`TrainingService`'s auto-captioning steps."""

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
        rating and age-related tags. Nothing is stored; the images captioned are charged (held before
        the captioner runs, captured when it is done, released if it fails). The user edits and
        submits them as `captions` (or in the zip), which are not captioned or charged again."""
        captioner = self.captioner()
        staging = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="captions."))
        try:
            report = run_intake(dataset, staging, self.deps.limits.intake)
            if len(report.images) > self.deps.limits.captioning.max_images:
                raise InvalidRequest(f"at most {self.deps.limits.captioning.max_images} images per captioning request",
                                     code="dataset_too_large")
            todo = [i for i in report.images if overwrite or not i.caption]
            price = self.deps.pricing.captioning_cost(len(todo))
            with self._captioning_charge(user_id, price):
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
            return {"captioner": captioner.kind, "images": proposals, "charged": price,
                    "skipped": [{"name": s.name, "reason": s.reason} for s in report.skipped]}
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def _captioning_charge(self, user_id: str, amount: int) -> Iterator[None]:
        """Hold `amount` before the captioner runs (a short balance refuses before any work), capture it
        when the block succeeds, release it when it raises."""
        if amount == 0:
            yield
            return
        charge = f"captions:{uuid.uuid4().hex}"
        hold = self.deps.ledger.hold(user_account(user_id), amount, key=f"{charge}:hold",
                                     destination=REVENUE_TRAINING, reason=f"auto-captioning {charge}",
                                     expires_at=self._hold_expiry())
        try:
            yield
        except BaseException:
            self.deps.ledger.release(hold.id, key=f"{charge}:release")
            raise
        self.deps.ledger.capture(hold.id, amount, key=f"{charge}:capture")

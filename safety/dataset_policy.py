"""The dataset policy: the check a training dataset passes before any training and any capture.

Every image goes through the image scan, every caption and the trigger words through the prompt
audit; then the dataset is judged as a whole, because a LoRA learns from all of it at once:

| rule                                 | action | when                                                         |
|--------------------------------------|--------|--------------------------------------------------------------|
| `dataset.minor_in_mature`            | block  | any mature image or caption AND any minor signal anywhere     |
| `dataset.real_person_mature`         | block  | declared real person AND any mature image or caption          |
| `dataset.caption_blocked`            | block  | the prompt audit blocks a caption or the trigger words        |
| `dataset.scan_failed`                | review | a scanner errored on an image (fails closed to a human)       |
| `dataset.minor_signal`               | review | a minor signal without mature material                        |
| `dataset.undeclared_real_person`     | review | captions name a real person but none was declared             |
| `dataset.caption_review`             | review | the prompt audit asks for review                              |

An image tagger's own signals (`TagSignal`: a mature rating, an age-related tag) count as an image
scan's do: a mature rating makes the dataset mature, an age-related tag is a minor signal.

A blocked dataset refuses the job; a reviewed one waits for a moderator with its hold kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from safety.image_scan import ImageScanner
from safety.levels import NsfwLevel
from safety.prompt_audit import PromptAuditor
from safety.verdict import Action, Reason, Verdict

PERSON_NAME_RULE = "person.name"


@dataclass(frozen=True)
class FileFinding:
    """What the checks said about one file (only files something fired on are kept)."""

    name: str
    rules: tuple[str, ...]
    level: str | None = None  # images: the scan's level

    def to_dict(self) -> dict:
        out = {"name": self.name, "rules": list(self.rules)}
        if self.level:
            out["level"] = self.level
        return out


@dataclass(frozen=True)
class DatasetVerdict(Verdict):
    """A `Verdict` on a whole dataset, with what fired on which file."""

    findings: tuple[FileFinding, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "findings": [f.to_dict() for f in self.findings]}


@dataclass(frozen=True)
class TagSignal:
    """What an auto-captioning tagger said about one image, for the rules above."""

    name: str
    rating: str | None = None
    mature: bool = False  # the rating is one the operator counts as mature
    minor_tags: tuple[str, ...] = ()


class DatasetImage(Protocol):
    """One image of an unpacked dataset, as intake reports it."""

    file: str  # relative to the dataset folder
    name: str
    caption: str
    caption_file: str | None


class DatasetReport(Protocol):
    images: Sequence[DatasetImage]


class DatasetPolicy:
    def __init__(self, auditor: PromptAuditor, scanner: ImageScanner):
        self.auditor = auditor
        self.scanner = scanner

    def check(self, dataset_dir: str | Path, report: DatasetReport, trigger_words: Sequence[str],
              real_person: bool, tag_signals: Sequence[TagSignal] = ()) -> DatasetVerdict:
        findings: list[FileFinding] = []
        mature = minor = scan_failed = caption_blocked = caption_review = named_person = False

        for image in report.images:
            with Image.open(Path(dataset_dir) / image.file) as img:
                scan = self.scanner.scan(img.convert("RGB"))
            rules = []
            if scan.scanner_errors:
                scan_failed = True
                rules.append("scan_failed")
            if scan.level.mature:
                mature = True
                rules.append(f"level.{scan.level.name}")
            if scan.minor_signal:
                minor = True
                rules.append("minor_signal")
            if rules or scan.level > NsfwLevel.PG:
                findings.append(FileFinding(image.name, tuple(rules), scan.level.name))

        for signal in tag_signals:
            rules = []
            if signal.mature:
                mature = True
                rules.append(f"tagger.rating.{signal.rating}")
            if signal.minor_tags:
                minor = True
                rules.append("tagger.minor_tag")
            if rules:
                findings.append(FileFinding(signal.name, tuple(rules)))

        texts = [(img.caption_file or img.name, img.caption) for img in report.images if img.caption]
        if trigger_words:
            texts.append(("trigger_words", ", ".join(trigger_words)))
        for name, text in texts:
            verdict = self.auditor.audit(text)
            mature = mature or verdict.mature
            minor = minor or verdict.minor_signal
            caption_blocked = caption_blocked or verdict.action is Action.block
            caption_review = caption_review or verdict.action is Action.review
            named_person = named_person or PERSON_NAME_RULE in verdict.rule_ids
            if verdict.rule_ids:
                findings.append(FileFinding(name, tuple(verdict.rule_ids)))

        checks = [
            (mature and minor, Action.block, "dataset.minor_in_mature", "minors in mature material"),
            (real_person and mature, Action.block, "dataset.real_person_mature", "a real person in mature material"),
            (caption_blocked, Action.block, "dataset.caption_blocked", "a caption or trigger word is not allowed"),
            (scan_failed, Action.review, "dataset.scan_failed", "an image could not be scanned"),
            (minor and not mature, Action.review, "dataset.minor_signal", "the dataset may depict minors"),
            (named_person and not real_person, Action.review, "dataset.undeclared_real_person",
             "captions name a real person but none was declared"),
            (caption_review, Action.review, "dataset.caption_review", "a caption needs review"),
        ]
        reasons = tuple(Reason(rule, message, "dataset") for fired, _, rule, message in checks if fired)
        actions = [action for fired, action, _, _ in checks if fired]
        action = max(actions, key=lambda a: a.rank) if actions else Action.allow
        return DatasetVerdict(action, reasons, mature=mature, minor_signal=minor, findings=tuple(findings))

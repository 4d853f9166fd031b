"""Image scan: rate each generated image PG / PG13 / R / X and collect minor signals.

The built-in scanner is NudeNet's detector (`nudenet.NudeDetector`, ONNX model shipped in the wheel,
fed BGR arrays). Each detection class maps to a level through score thresholds in
`configs/safety/image_scan.yaml`; an image's level is the highest any detection reaches. Defaults:

| NudeNet class                                                    | score >= 0.25 | score >= 0.45 |
|------------------------------------------------------------------|---------------|---------------|
| FEMALE_GENITALIA_EXPOSED, MALE_GENITALIA_EXPOSED, ANUS_EXPOSED    | R             | X             |
| FEMALE_BREAST_EXPOSED, BUTTOCKS_EXPOSED                          | PG13          | R             |
| FEMALE_GENITALIA_COVERED, FEMALE_BREAST_COVERED, BUTTOCKS_COVERED, ANUS_COVERED | -  | PG13          |
| MALE_BREAST_EXPOSED, BELLY_*, ARMPITS_*, FEET_*, FACE_*           | -             | PG (recorded) |

Low-confidence exposure already raises the level: a missed nude image is worse than a withheld one.

Extra scanners (a VLM, an age classifier, where their weights exist) implement `Scanner` and are
listed in the YAML by import path; each can raise the level or add a minor signal, never lower
either. Every scanner runs with a timeout; an exception or timeout FAILS CLOSED: it is reported in
`ScanResult.scanner_errors`, and the policy withholds the image with rule `scan_failed`.
"""

from __future__ import annotations

import enum
import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safety.errors import RulesInvalid

CONFIG_FILE = "image_scan.yaml"


class NsfwLevel(enum.IntEnum):
    """Civitai's browsing levels (bit values kept so they can be OR-ed into level sets)."""

    PG = 1
    PG13 = 2
    R = 4
    X = 8

    @classmethod
    def parse(cls, value: str | int | NsfwLevel) -> NsfwLevel:
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls(value)
        key = str(value).strip().upper().replace("-", "")
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unknown NSFW level {value!r}; use one of {[lvl.name for lvl in cls]}") from None

    @property
    def mature(self) -> bool:
        return self >= NsfwLevel.R


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[int, ...] = ()
    source: str = "nudenet"
    level: NsfwLevel = NsfwLevel.PG

    def to_dict(self) -> dict:
        return {"label": self.label, "score": round(self.score, 4), "box": list(self.box), "source": self.source,
                "level": self.level.name}


@dataclass(frozen=True)
class ScannerOutput:
    """What one scanner says about one image."""

    level: NsfwLevel = NsfwLevel.PG
    detections: tuple[Detection, ...] = ()
    minor_signal: bool = False


@dataclass(frozen=True)
class ScanResult:
    level: NsfwLevel
    detections: tuple[Detection, ...] = ()
    minor_signal: bool = False
    scanner_errors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> bool:
        return bool(self.scanner_errors)

    def to_dict(self) -> dict:
        return {"level": self.level.name, "detections": [d.to_dict() for d in self.detections],
                "minor_signal": self.minor_signal, "scanner_errors": list(self.scanner_errors)}


@runtime_checkable
class Scanner(Protocol):
    """An image classifier the scan consults. Raise on any doubt about its own result."""

    name: str

    def scan(self, image: Image.Image) -> ScannerOutput: ...


# ------------------------------------------------------------------------------------------------
# Configuration


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Threshold(_Config):
    min_score: float = Field(ge=0.0, le=1.0)
    level: NsfwLevel

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, v: Any) -> NsfwLevel:
        return NsfwLevel.parse(v)


class ExtraScanner(_Config):
    path: str = Field(pattern=r"^[\w.]+:[\w]+$", description="module.path:ClassName")
    options: dict[str, Any] = {}


class ImageScanConfig(_Config):
    timeout_s: float = Field(10.0, gt=0)
    nudenet: dict[str, list[Threshold]]
    extra_scanners: list[ExtraScanner] = []

    @classmethod
    def load(cls, path: str | Path) -> ImageScanConfig:
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise RulesInvalid(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Scanners


class NudeNetScanner:
    """NudeNet's detector, classes mapped to levels by score thresholds."""

    name = "nudenet"

    def __init__(self, thresholds: Mapping[str, Sequence[Threshold]], detector: Any | None = None):
        if detector is None:
            from nudenet import NudeDetector

            detector = NudeDetector()
        self.detector = detector
        self.thresholds = {label: sorted(ts, key=lambda t: t.min_score) for label, ts in thresholds.items()}
        self._lock = threading.Lock()  # one ONNX session; calls are serialised per scanner

    def level_of(self, label: str, score: float) -> NsfwLevel | None:
        """The level a detection reaches, or None when below every threshold of its class."""
        level = None
        for t in self.thresholds.get(label, ()):
            if score >= t.min_score:
                level = t.level if level is None else max(level, t.level)
        return level

    def scan(self, image: Image.Image) -> ScannerOutput:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with self._lock:
            raw = self.detector.detect(bgr)
        detections = []
        for d in raw:
            label, score = str(d["class"]), float(d["score"])
            level = self.level_of(label, score)
            if level is not None:
                detections.append(Detection(label, score, tuple(int(x) for x in d.get("box", ())), self.name, level))
        level = max((d.level for d in detections), default=NsfwLevel.PG)
        return ScannerOutput(level, tuple(detections))


def _import_scanner(spec: ExtraScanner) -> Scanner:
    module_name, _, attr = spec.path.partition(":")
    try:
        scanner = getattr(importlib.import_module(module_name), attr)(**spec.options)
    except Exception as exc:  # noqa: BLE001 - a scanner that cannot start makes the config invalid
        raise RulesInvalid(f"extra scanner {spec.path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(scanner, Scanner):
        raise RulesInvalid(f"extra scanner {spec.path} has no name/scan(image)")
    return scanner


class ImageScanner:
    """Runs every scanner on an image, each under a timeout, and merges what they say (fail closed)."""

    def __init__(self, scanners: Sequence[Scanner], timeout_s: float = 10.0):
        if not scanners:
            raise RulesInvalid("an image scan needs at least one scanner")
        self.scanners = tuple(scanners)
        self.timeout_s = timeout_s

    @classmethod
    def from_config(cls, config: ImageScanConfig | str | Path, *, detector: Any | None = None,
                    extra: Sequence[Scanner] = ()) -> ImageScanner:
        """From `configs/safety/image_scan.yaml` (a path or a loaded config). `detector` replaces the
        NudeNet detector object (tests); `extra` adds scanner objects to those the config lists."""
        if not isinstance(config, ImageScanConfig):
            path = Path(config)
            config = ImageScanConfig.load(path / CONFIG_FILE if path.is_dir() else path)
        scanners: list[Scanner] = [NudeNetScanner(config.nudenet, detector)]
        scanners += [_import_scanner(s) for s in config.extra_scanners]
        scanners += list(extra)
        return cls(scanners, config.timeout_s)

    def _run(self, scanner: Scanner, image: Image.Image) -> ScannerOutput:
        """One scanner under the timeout. A daemon thread, so a hung scanner cannot hold up later scans."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["out"] = scanner.scan(image)
            except BaseException as exc:  # noqa: BLE001 - reported, and the image is withheld
                box["err"] = exc

        thread = threading.Thread(target=target, name=f"scan-{scanner.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"no answer within {self.timeout_s:g} s")
        if "err" in box:
            raise box["err"]
        out = box.get("out")
        if not isinstance(out, ScannerOutput):
            raise TypeError(f"returned {type(out).__name__}, not ScannerOutput")
        return out

    def scan(self, image: Image.Image) -> ScanResult:
        level, detections, minor, errors = NsfwLevel.PG, [], False, []
        for scanner in self.scanners:
            try:
                out = self._run(scanner, image)
            except BaseException as exc:  # noqa: BLE001 - fail closed, never raise past the scan
                errors.append(f"{scanner.name}: {type(exc).__name__}: {exc}")
                continue
            level = max(level, NsfwLevel.parse(out.level))
            detections.extend(out.detections)
            minor = minor or bool(out.minor_signal)
        return ScanResult(level, tuple(detections), minor, tuple(errors))

"""Image scan: rate each generated image PG / PG13 / R / X and collect minor signals.

The built-in scanner is NudeNet's detector (the ONNX model shipped in its wheel, run by
`NudeNetDetector`, fed BGR arrays). Each detection class maps to a level through score thresholds in
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

import importlib
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safety.errors import RulesInvalid
from safety.levels import NsfwLevel

CONFIG_FILE = "image_scan.yaml"
FACE_LABELS = ("FACE_FEMALE", "FACE_MALE")
# The lowest score at which a detected face counts, for the face fix (its default confidence, as
# ADetailer's) and for the input-image rules alike: a face the face fix would repaint is a face the
# nudify rule must see. Configuration may lower it (count more faces), never raise it.
FACE_SCORE_FLOOR = 0.3


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
    # the score from which an input image's face counts for the input rules (never above the floor)
    face_min_score: float = Field(FACE_SCORE_FLOOR, gt=0.0, le=FACE_SCORE_FLOOR)

    @field_validator("nudenet")
    @classmethod
    def _known_classes(cls, value: dict[str, list[Threshold]]) -> dict[str, list[Threshold]]:
        """A misspelt class would silently never raise a level: refuse it at start."""
        unknown = sorted(set(value) - set(NUDENET_LABELS))
        if unknown:
            raise ValueError(f"unknown NudeNet classes {unknown}; known: {list(NUDENET_LABELS)}")
        exposed = {"FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_EXPOSED", "FEMALE_BREAST_EXPOSED"}
        if missing := sorted(exposed - set(value)):
            raise ValueError(f"the exposure classes {missing} must have thresholds")
        if missing := sorted(set(FACE_LABELS) - set(value)):
            # without them no face is recorded and the input rules (nudify, face edits) never fire
            raise ValueError(f"the face classes {missing} must have thresholds (the input-image rules need faces)")
        return value

    @model_validator(mode="after")
    def _faces_recorded(self) -> ImageScanConfig:
        """A face class whose lowest threshold is above `face_min_score` would drop faces the input
        rules count: refused, so configuration cannot raise the face floor silently."""
        for label in FACE_LABELS:
            lowest = min((t.min_score for t in self.nudenet[label]), default=1.0)
            if lowest > self.face_min_score:
                raise ValueError(f"{label} is recorded from {lowest:g}, above face_min_score "
                                 f"{self.face_min_score:g}: faces would go unseen by the input-image rules")
        return self

    @classmethod
    def load(cls, path: str | Path) -> ImageScanConfig:
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise RulesInvalid(f"{path}: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# Scanners


# The 320n model's output classes, in its order.
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)


class NudeNetDetector:
    """NudeNet's 320n detector (the ONNX model in its wheel) on an onnxruntime session of our own.

    Input and decoding are those of `nudenet.NudeDetector.detect` (image padded to a square and
    resized to 320², candidates scoring >= 0.2, NMS at 0.25 / 0.45), with two differences that
    matter on a replica: the session's thread count is the caller's (a replica's CPU budget; 0 is
    every core this process may use), and the decoding is vectorised (NudeNet's loops over the
    2,100 anchors in Python, a third of the scan's time on a small image).

    The count is always given to onnxruntime as a number: left at its default, onnxruntime pins its
    worker threads to cores, and a pinned thread waits behind whatever else runs on its core (on
    2 cores, a scan right after a denoise took 35-47 ms pinned and 18-23 ms unpinned)."""

    size = 320

    def __init__(self, threads: int = 0, model_path: str | Path | None = None):
        import onnxruntime
        from nudenet import nudenet

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        path = model_path or Path(nudenet.__file__).with_name("320n.onnx")
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def detect(self, bgr: np.ndarray) -> list[dict]:
        """Detections (`class`, `score`, `box` as x, y, w, h) in an (H, W, 3) BGR uint8 image."""
        import cv2

        height, width = bgr.shape[:2]
        mat = cv2.cvtColor(bgr, cv2.COLOR_RGBA2BGR)
        side = max(height, width)
        padded = cv2.copyMakeBorder(mat, 0, side - height, 0, side - width, cv2.BORDER_CONSTANT)
        blob = cv2.dnn.blobFromImage(padded, 1 / 255.0, (self.size, self.size), (0, 0, 0), swapRB=True, crop=False)
        output = self.session.run(None, {self.input_name: blob})[0]
        return decode_nudenet(output, width, height, side - width, side - height, self.size)


def decode_nudenet(output: np.ndarray, width: int, height: int, x_pad: int, y_pad: int, size: int) -> list[dict]:
    """The model's raw output (1, 4 + classes, anchors) as detections in image coordinates."""
    import cv2

    rows = np.transpose(np.squeeze(output))
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    keep = best >= 0.2
    rows, best, class_ids = rows[keep], best[keep], class_scores[keep].argmax(axis=1)
    w_center, h_center = rows[:, 2], rows[:, 3]
    x = (rows[:, 0] - w_center / 2) * (width + x_pad) / size
    y = (rows[:, 1] - h_center / 2) * (height + y_pad) / size
    w = w_center * (width + x_pad) / size
    h = h_center * (height + y_pad) / size
    x = np.clip(x, 0, width)
    y = np.clip(y, 0, height)
    w = np.minimum(w, width - x)
    h = np.minimum(h, height - y)
    boxes = np.stack([x, y, w, h], axis=1).tolist()
    scores = best.tolist()
    return [
        {"class": NUDENET_LABELS[int(class_ids[i])], "score": scores[i], "box": [int(v) for v in boxes[i]]}
        for i in cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)
    ]


class NudeNetScanner:
    """NudeNet's detector, classes mapped to levels by score thresholds."""

    name = "nudenet"

    def __init__(self, thresholds: Mapping[str, Sequence[Threshold]], detector: Any | None = None,
                 threads: int = 0):
        self.detector = detector if detector is not None else NudeNetDetector(threads)
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

    def faces(self, image: Image.Image, min_score: float) -> list[tuple[tuple[int, int, int, int], float]]:
        """The faces NudeNet finds at `min_score` or above, as ((x1, y1, x2, y2), score): the face fix's
        detector, below the scan's own recording threshold on purpose (ADetailer's default is 0.3)."""
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        with self._lock:
            raw = self.detector.detect(bgr)
        out = []
        for d in raw:
            if str(d["class"]) in FACE_LABELS and float(d["score"]) >= min_score:
                x, y, w, h = (int(v) for v in d["box"])
                out.append(((x, y, x + w, y + h), float(d["score"])))
        return out


def _import_scanner(spec: ExtraScanner) -> Scanner:
    module_name, _, attr = spec.path.partition(":")
    try:
        scanner = getattr(importlib.import_module(module_name), attr)(**spec.options)
    except Exception as exc:  # noqa: BLE001 - a scanner that cannot start makes the config invalid
        raise RulesInvalid(f"extra scanner {spec.path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(scanner, Scanner):
        raise RulesInvalid(f"extra scanner {spec.path} has no name/scan(image)")
    return scanner


class _ScanThread:
    """A daemon thread that runs one scanner's calls in turn. Reused because ONNX Runtime keeps
    per-thread buffers: the 320n detector scans in ~13 ms on a thread it has seen and 18-36 ms on a
    fresh one. A daemon, so a scanner hung past its timeout cannot hold up the process's exit."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
        return future

    def stop(self) -> None:
        """End the thread once the calls already submitted have run."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, future = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting scan
                future.set_exception(exc)


class ImageScanner:
    """Runs every scanner on an image, each under a timeout, and merges what they say (fail closed)."""

    def __init__(self, scanners: Sequence[Scanner], timeout_s: float = 10.0,
                 face_min_score: float = FACE_SCORE_FLOOR):
        if not scanners:
            raise RulesInvalid("an image scan needs at least one scanner")
        self.scanners = tuple(scanners)
        self.timeout_s = timeout_s
        self.face_min_score = min(face_min_score, FACE_SCORE_FLOOR)
        self._threads: dict[int, _ScanThread] = {}
        self._threads_lock = threading.Lock()

    def __del__(self) -> None:
        for thread in getattr(self, "_threads", {}).values():
            thread.stop()

    @classmethod
    def from_config(cls, config: ImageScanConfig | str | Path, *, detector: Any | None = None,
                    extra: Sequence[Scanner] = (), threads: int = 0) -> ImageScanner:
        """From `configs/safety/image_scan.yaml` (a path or a loaded config). `detector` replaces the
        NudeNet detector object (tests); `extra` adds scanner objects to those the config lists;
        `threads` caps the detector's CPU threads (0: every core)."""
        if not isinstance(config, ImageScanConfig):
            path = Path(config)
            config = ImageScanConfig.load(path / CONFIG_FILE if path.is_dir() else path)
        scanners: list[Scanner] = [NudeNetScanner(config.nudenet, detector, threads)]
        scanners += [_import_scanner(s) for s in config.extra_scanners]
        scanners += list(extra)
        return cls(scanners, config.timeout_s, config.face_min_score)

    def _run(self, index: int, image: Image.Image) -> ScannerOutput:
        """One scanner under the timeout, on its own long-lived thread. A scanner that hangs keeps its
        thread; the next scan starts a new one, so a hung scanner cannot hold up later scans."""
        scanner = self.scanners[index]
        with self._threads_lock:
            thread = self._threads.get(index)
            if thread is None:
                thread = self._threads[index] = _ScanThread(f"scan-{scanner.name}")
        future = thread.submit(lambda: scanner.scan(image))
        try:
            out = future.result(self.timeout_s)
        except FutureTimeout:
            with self._threads_lock:
                if self._threads.get(index) is thread:
                    del self._threads[index]
            thread.stop()  # it ends once the hung call returns, if it ever does
            raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None
        if not isinstance(out, ScannerOutput):
            raise TypeError(f"returned {type(out).__name__}, not ScannerOutput")
        return out

    def faces(self, image: Image.Image, min_score: float) -> list[tuple[tuple[int, int, int, int], float]]:
        """Face boxes from the NudeNet scanner (the face fix's detector); raises when there is none."""
        for scanner in self.scanners:
            if isinstance(scanner, NudeNetScanner):
                return scanner.faces(image, min_score)
        raise RulesInvalid("no NudeNet scanner to detect faces with")

    def scan(self, image: Image.Image) -> ScanResult:
        level, detections, minor, errors = NsfwLevel.PG, [], False, []
        for index, scanner in enumerate(self.scanners):
            try:
                out = self._run(index, image)
            except BaseException as exc:  # noqa: BLE001 - fail closed, never raise past the scan
                errors.append(f"{scanner.name}: {type(exc).__name__}: {exc}")
                continue
            level = max(level, NsfwLevel.parse(out.level))
            detections.extend(out.detections)
            minor = minor or bool(out.minor_signal)
        return ScanResult(level, tuple(detections), minor, tuple(errors))

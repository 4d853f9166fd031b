"""Auto-captioning of training images: a pluggable captioner of two kinds.

- `wd_tagger`: a WD-style ONNX image tagger (SmilingWolf's WD 1.4 / v3 layout) run by onnxruntime:
  one NHWC BGR float input (0-255, padded square on white), one sigmoid output per tag, and the
  tag list as the model's `selected_tags.csv` (`tag_id,name,category,count`; category 9 = rating,
  4 = character, 0 = general). Tags over the general / character thresholds become the caption
  (character tags first, then general by confidence, underscores as spaces, as kohya's tagger
  writes them). The rating tags and the configured age-related tags are returned beside the caption
  so the dataset policy can weigh them.
- `vlm`: a vision-language model captioner. The model runner is a backend the operator registers
  under a name (`register_vlm_backend`); the config names it. No backend ships with the service.

Model files are paths the operator provides in config; nothing is downloaded. Generated captions
go through the same prompt audit and dataset policy as the user's own.
"""

from __future__ import annotations

import csv
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from genserve.core.errors import ConfigError, GenserveError

log = logging.getLogger(__name__)

RATING, GENERAL, CHARACTER = 9, 0, 4


class CaptionerUnavailable(GenserveError):
    code = "captioner_unavailable"
    http_status = 409


@dataclass(frozen=True)
class Caption:
    text: str
    source: str  # the captioner's kind
    tags: tuple[str, ...] = ()
    rating: str | None = None  # the tagger's most confident rating tag
    minor_tags: tuple[str, ...] = ()  # tags on the configured age-related list

    def to_dict(self) -> dict:
        return {"caption": self.text, "source": self.source, "tags": list(self.tags), "rating": self.rating,
                "minor_tags": list(self.minor_tags)}


class Captioner(Protocol):
    kind: str

    def caption(self, images: Sequence[Image.Image]) -> list[Caption]: ...


@dataclass(frozen=True)
class _Tag:
    name: str
    category: int


def read_tag_list(path: str | Path) -> list[_Tag]:
    """A WD `selected_tags.csv`: a header row with `name` and `category` columns, one tag per row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise ConfigError(f"tag list {path} needs `name` and `category` columns", code="config_invalid")
    return [_Tag(r["name"], int(r["category"])) for r in rows]


def _normalise(tag: str) -> str:
    return tag.strip().lower().replace(" ", "_")


class WdTagger:
    """A WD-style ONNX tagger (see the module docstring)."""

    kind = "wd_tagger"

    def __init__(self, model_path: str | Path, tags_csv: str | Path, *, general_threshold: float = 0.35,
                 character_threshold: float = 0.85, max_tags: int = 40, replace_underscores: bool = True,
                 exclude_tags: Sequence[str] = (), minor_tags: Sequence[str] = (), providers: Sequence[str] | None = None):
        import onnxruntime as ort

        if not Path(model_path).is_file() or not Path(tags_csv).is_file():
            raise CaptionerUnavailable(f"tagger model {model_path} or tag list {tags_csv} is missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        available = ort.get_available_providers()
        chosen = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
        self.session = ort.InferenceSession(str(model_path), options, providers=chosen or ["CPUExecutionProvider"])
        self.tags = read_tag_list(tags_csv)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[1]) if isinstance(inp.shape[1], int) else 448
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise ConfigError(f"the tagger has {outputs[-1]} outputs but its tag list {len(self.tags)} tags",
                              code="config_invalid")
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.max_tags, self.replace_underscores = max_tags, replace_underscores
        self.exclude = {_normalise(t) for t in exclude_tags}
        self.minor = {_normalise(t) for t in minor_tags}
        self._lock = threading.Lock()

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """RGB on white, padded to a square, resized to the model's side, as BGR float32 0-255 (NHWC)."""
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image)
        rgb = canvas.convert("RGB")
        side = max(rgb.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(square, dtype=np.float32)[:, :, ::-1]

    def caption(self, images: Sequence[Image.Image]) -> list[Caption]:
        out = []
        for image in images:
            batch = self._pixels(image)[None].copy()
            with self._lock:
                probs = self.session.run(None, {self.input_name: batch})[0][0]
            out.append(self._caption(probs))
        return out

    def _caption(self, probs: np.ndarray) -> Caption:
        ratings = [(float(p), t.name) for p, t in zip(probs, self.tags, strict=True) if t.category == RATING]
        chars = sorted(((float(p), t.name) for p, t in zip(probs, self.tags, strict=True)
                        if t.category == CHARACTER and p >= self.character_threshold), reverse=True)
        general = sorted(((float(p), t.name) for p, t in zip(probs, self.tags, strict=True)
                          if t.category == GENERAL and p >= self.general_threshold), reverse=True)
        kept = [name for _, name in chars + general if _normalise(name) not in self.exclude][: self.max_tags]
        minor = tuple(name for _, name in chars + general if _normalise(name) in self.minor)
        shown = [n.replace("_", " ") if self.replace_underscores and len(n) > 3 else n for n in kept]
        return Caption(", ".join(shown), self.kind, tuple(kept), max(ratings)[1] if ratings else None, minor)


class VlmBackend(Protocol):
    def describe(self, image: Image.Image, prompt: str) -> str: ...


VlmFactory = Callable[[dict], VlmBackend]
_VLM_BACKENDS: dict[str, VlmFactory] = {}


def register_vlm_backend(name: str, factory: VlmFactory) -> None:
    """Make a vision-language model runner available to `captioning.kind: vlm` under `name`;
    `factory(options)` gets the config's `vlm_options` (a model path and the like)."""
    _VLM_BACKENDS[name] = factory


class VlmCaptioner:
    kind = "vlm"

    def __init__(self, backend: VlmBackend, prompt: str, max_chars: int):
        self.backend, self.prompt, self.max_chars = backend, prompt, max_chars

    def caption(self, images: Sequence[Image.Image]) -> list[Caption]:
        out = []
        for image in images:
            text = " ".join(str(self.backend.describe(image.convert("RGB"), self.prompt)).split())
            out.append(Caption(text[: self.max_chars], self.kind))
        return out


@dataclass(frozen=True)
class CaptionProposal:
    """One image's caption as the user will see it before submitting."""

    name: str  # the file's name in the upload
    caption: str
    source: str  # "user" (from the upload) or the captioner's kind
    tags: tuple[str, ...] = ()
    rating: str | None = None
    minor_tags: tuple[str, ...] = ()
    audit: dict = field(default_factory=dict)  # the prompt audit's action and rules on the caption

    def to_dict(self) -> dict:
        return {"name": self.name, "caption": self.caption, "source": self.source, "tags": list(self.tags),
                "rating": self.rating, "minor_tags": list(self.minor_tags), "audit": self.audit}


def build_captioner(settings, config_dir: Path | None = None) -> Captioner | None:  # noqa: ANN001 - CaptioningSettings
    """The configured captioner, or None when captioning is off. Relative paths are under `config_dir`."""
    if settings.kind == "none":
        return None

    def resolve(path: str | None) -> Path:
        if not path:
            raise CaptionerUnavailable(f"captioning kind {settings.kind} needs a model path in config")
        p = Path(path)
        return p if p.is_absolute() or config_dir is None else config_dir / p

    if settings.kind == "wd_tagger":
        return WdTagger(resolve(settings.model_path), resolve(settings.tags_csv),
                        general_threshold=settings.general_threshold,
                        character_threshold=settings.character_threshold, max_tags=settings.max_tags,
                        replace_underscores=settings.replace_underscores, exclude_tags=settings.exclude_tags,
                        minor_tags=settings.minor_tags)
    factory = _VLM_BACKENDS.get(settings.vlm_backend or "")
    if factory is None:
        raise CaptionerUnavailable(f"no vision-language backend {settings.vlm_backend!r} is registered here")
    return VlmCaptioner(factory(dict(settings.vlm_options)), settings.vlm_prompt, settings.max_caption_chars)

"""What an uploaded file is, read from its safetensors header alone, before anything is stored.

`read_header` checks that the header tells the truth about the bytes after it: every tensor has a
known dtype, a shape and offsets whose length is shape × dtype size, the tensors tile the payload
exactly (no gap, no overlap, nothing past the end, nothing unindexed), and no name appears twice.
A file that is not safetensors at all (a pickle `.ckpt`, a zip) is `not_safetensors`; one whose
header lies is `safetensors_header_invalid`.

`inspect_file` then tells the kind (checkpoint, LoRA in its flavours, textual inversion, VAE) and the
model family from the tensor names and shapes only (SD1's cross-attention context is 768 wide with
one text encoder, SDXL's 2048 with two), and the hashes a site knows resources by: SHA-256 of the
file, AutoV2 (its first 10 hex digits) and AutoV3 (12 hex digits of the tensor-payload SHA-256).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve.core.errors import InvalidRequest
from genserve.engine.infotext import autov2, autov3
from genserve.resources.models import ModelFamily, ResourceKind
from safety.errors import NotSafetensors
from safety.hashing import file_hashes

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# Width of the UNet's cross-attention context (attn2.to_k's input) -> family. The last two are the
# widths of the offline tiny test models (`genserve.tinymodels`: SD1 32, SDXL 32 + 48).
CONTEXT_WIDTHS: dict[int, str] = {768: "sd1", 2048: "sdxl", 1024: "sd2", 32: "sd1", 80: "sdxl"}
SUPPORTED_FAMILIES = frozenset(f.value for f in ModelFamily)


class NotSafetensorsFile(InvalidRequest):
    code = "not_safetensors"


class SafetensorsHeaderInvalid(InvalidRequest):
    """The header does not describe the bytes after it (offsets, dtypes or shapes are inconsistent)."""

    code = "safetensors_header_invalid"


class ResourceKindUnknown(InvalidRequest):
    code = "resource_kind_unknown"


class ResourceKindMismatch(InvalidRequest):
    code = "resource_kind_mismatch"


class FamilyMismatch(InvalidRequest):
    code = "family_mismatch"


class FamilyUndetected(InvalidRequest):
    code = "family_undetected"


class FamilyUnsupported(InvalidRequest):
    code = "family_unsupported"


class LycorisUnsupported(InvalidRequest):
    code = "lycoris_unsupported"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    payload_bytes: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise SafetensorsHeaderInvalid(f"the header names {key!r} twice", details={"tensor": key})
        out[key] = value
    return out


def read_header(path: str | Path) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file's size; raises NotSafetensorsFile or
    SafetensorsHeaderInvalid."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise NotSafetensorsFile("too short to be a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise NotSafetensorsFile("not a safetensors file (no header length at its start); "
                                     "resources are safetensors only, never pickles")
        raw = f.read(n)
    if not raw.lstrip().startswith(b"{"):
        raise NotSafetensorsFile("not a safetensors file (its header is not JSON)")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, SafetensorsHeaderInvalid):
            raise
        raise NotSafetensorsFile(f"not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise NotSafetensorsFile("not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise SafetensorsHeaderInvalid("__metadata__ must map strings to strings")
    payload = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor(name, entry)
    cursor = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != cursor:
            what = "overlaps the tensor before it" if info.begin < cursor else "leaves a gap before it"
            raise SafetensorsHeaderInvalid(f"tensor {name!r} {what} (offset {info.begin}, expected {cursor})",
                                           details={"tensor": name})
        cursor = info.end
    if cursor != payload:
        raise SafetensorsHeaderInvalid(
            f"the header indexes {cursor} bytes of tensors but the file holds {payload}",
            details={"indexed_bytes": cursor, "payload_bytes": payload})
    if not tensors:
        raise SafetensorsHeaderInvalid("the file holds no tensors")
    return SafetensorsHeader(tensors, dict(metadata), n, payload)


def _tensor(name: str, entry: Any) -> TensorInfo:
    def bad(why: str) -> SafetensorsHeaderInvalid:
        return SafetensorsHeaderInvalid(f"tensor {name!r}: {why}", details={"tensor": name})

    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad("an entry holds exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad("shape must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad("data_offsets must be [begin, end] with 0 <= begin <= end")
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise bad(f"{offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape} ({expected} bytes)")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


# ------------------------------------------------------------------------------------------- kinds

_LORA_WEIGHT = re.compile(
    r"(\.lora_(down|up)\.weight|\.lora_[AB](\.[^.]+)?\.weight|\.lora(_linear_layer)?\.(down|up)\.weight"
    r"|_lora\.(down|up)\.weight)$")
_LORA_EXTRA = re.compile(r"(\.alpha|\.dora_scale|\.lora_magnitude_vector(\.[^.]+)?(\.weight)?)$")
_LOHA = re.compile(r"\.hada_(w1_a|w1_b|w2_a|w2_b)$")
_LOKR = re.compile(r"\.lokr_(w1|w1_a|w1_b|w2|w2_a|w2_b)$")
_LYCORIS_UNSUPPORTED = re.compile(r"\.(hada_t1|hada_t2|lokr_t2|diff|diff_b|lokr_t1|oft_blocks|oft_diag)$")
_CHECKPOINT_PREFIX = "model.diffusion_model."
_TE2_MARKERS = ("lora_te2_", "text_encoder_2.", "conditioner.embedders.1.")
_EMBEDDING_SDXL_KEYS = {"clip_l", "clip_g"}
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")  # a VAE cut out of a full checkpoint keeps its prefix


@dataclass(frozen=True)
class Inspection:
    """What a file is: kind, family (or None when the keys do not tell), LoRA flavour, hashes."""

    kind: ResourceKind
    family: str | None
    format: str  # checkpoint | lora | locon | loha | lokr | dora | embedding | vae
    layout: str  # ldm | kohya | diffusers | peft | lycoris | embedding
    sha256: str
    tensor_sha256: str
    size_bytes: int
    tensors: int
    metadata: dict[str, str] = field(default_factory=dict)
    vectors: int | None = None  # an embedding's vectors per encoder

    @property
    def autov2(self) -> str:
        return autov2(self.sha256).upper()

    @property
    def autov3(self) -> str:
        return autov3(self.tensor_sha256).upper()

    def hashes(self) -> dict[str, str]:
        return {"sha256": self.sha256, "tensor_sha256": self.tensor_sha256, "autov2": self.autov2,
                "autov3": self.autov3}


def _context_family(width: int) -> str | None:
    return CONTEXT_WIDTHS.get(width)


def _lora_context_width(name: str, info: TensorInfo, tensors: dict[str, TensorInfo]) -> int | None:
    """The input width of a LoRA module on attn2's key projection (the cross-attention context)."""
    flat = name.replace(".", "_")
    if "attn2_to_k" not in flat:
        return None
    if _LORA_WEIGHT.search(name) and (".lora_down." in name or ".lora_A" in name or ".down." in name) \
            and len(info.shape) == 2:
        return info.shape[1]
    if name.endswith(".hada_w1_b") and len(info.shape) == 2:
        return info.shape[1]
    if name.endswith((".lokr_w1", ".lokr_w1_b")):
        module = name.rsplit(".", 1)[0]
        w2 = tensors.get(f"{module}.lokr_w2") or tensors.get(f"{module}.lokr_w2_b")
        if w2 is not None and len(info.shape) == 2 and len(w2.shape) == 2:
            return info.shape[1] * w2.shape[1]
    return None


def _detect_checkpoint_family(tensors: dict[str, TensorInfo]) -> str | None:
    names = tensors.keys()
    if any(n.startswith("conditioner.embedders.1.") for n in names):
        return "sdxl"
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "sd2"  # OpenCLIP as the only text encoder
    widths = {info.shape[1] for n, info in tensors.items()
              if n.startswith(_CHECKPOINT_PREFIX) and n.endswith("attn2.to_k.weight") and len(info.shape) == 2}
    families = {_context_family(w) for w in widths}
    if len(families) == 1 and None not in families:
        return families.pop()
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        return "sd1"
    return None


def _detect_lora_family(tensors: dict[str, TensorInfo]) -> str | None:
    if any(n.startswith(_TE2_MARKERS) or ".text_encoder_2." in n for n in tensors):
        return "sdxl"
    widths = {w for n, info in tensors.items() if (w := _lora_context_width(n, info, tensors)) is not None}
    families = {_context_family(w) for w in widths}
    if families and len(families) == 1 and None not in families:
        return families.pop()
    if len(families) > 1:
        return "mixed"
    if any(n.startswith("lora_te_") for n in tensors):  # kohya names SD1's one text encoder te, SDXL's te1/te2
        return "sd1"
    return None


def _lora_format(tensors: dict[str, TensorInfo]) -> tuple[str, str]:
    """(format, layout) of a LoRA-like file; raises on keys no loader understands."""
    names = list(tensors)
    loha = any(_LOHA.search(n) for n in names)
    lokr = any(_LOKR.search(n) for n in names)
    unsupported = [n for n in names if _LYCORIS_UNSUPPORTED.search(n)]
    if unsupported:
        raise LycorisUnsupported(f"LyCORIS tensors of an unsupported kind (Tucker, full diff, OFT): "
                                 f"{unsupported[0]!r}", details={"tensor": unsupported[0]})
    strays = [n for n in names if not (_LORA_WEIGHT.search(n) or _LORA_EXTRA.search(n) or _LOHA.search(n)
                                       or _LOKR.search(n))]
    if strays:
        raise ResourceKindUnknown(f"{len(strays)} tensors are no LoRA weights (e.g. {strays[0]!r})",
                                  details={"tensor": strays[0]})
    if loha or lokr:
        if any(_LORA_WEIGHT.search(n) for n in names) or (loha and lokr):
            return "lycoris", "lycoris"  # mixed LyCORIS modules: converted module by module
        return ("loha" if loha else "lokr"), "lycoris"
    if any(".lora_A" in n or ".lora_B" in n for n in names):
        layout = "peft"
    elif any(n.startswith(("lora_unet_", "lora_te")) for n in names):
        layout = "kohya"
    else:
        layout = "diffusers"
    if any(n.endswith((".dora_scale",)) or ".lora_magnitude_vector" in n for n in names):
        return "dora", layout
    conv = any(len(info.shape) == 4 and _LORA_WEIGHT.search(n) for n, info in tensors.items())
    return ("locon" if conv else "lora"), layout


def _embedding(tensors: dict[str, TensorInfo]) -> tuple[str | None, int] | None:
    """(family, vectors) when the file is a textual-inversion embedding, else None."""
    if set(tensors) == _EMBEDDING_SDXL_KEYS:
        shapes = [tensors[k].shape for k in ("clip_l", "clip_g")]
        if all(len(s) == 2 for s in shapes) and shapes[0][0] == shapes[1][0]:
            return "sdxl", shapes[0][0]
        raise ResourceKindUnknown("an SDXL embedding holds clip_l and clip_g with the same number of vectors")
    if len(tensors) == 1:
        (name, info), = tensors.items()
        if name.startswith(_CHECKPOINT_PREFIX) or _LORA_WEIGHT.search(name) or len(info.shape) not in (1, 2):
            return None
        width = info.shape[-1]
        vectors = 1 if len(info.shape) == 1 else info.shape[0]
        if not 1 <= vectors <= 75:
            return None
        # an SD1 embedding is as wide as CLIP-L (768); SD2's OpenCLIP is 1024 wide
        return ("sd2" if width == 1024 else "sd1" if width in (768, 32) else None), vectors
    return None


def _vae_layout(tensors: dict[str, TensorInfo]) -> str | None:
    """"ldm" or "diffusers" when the file is a VAE alone (encoder and decoder, nothing else), else None.
    SD1 and SDXL VAEs have one architecture, so a VAE never tells its family: it is declared."""
    names = [next((n[len(p):] for p in _VAE_PREFIXES if n.startswith(p)), n) for n in tensors]
    if not names or not all(n.startswith(_VAE_PARTS) for n in names):
        return None
    if not any(n.startswith("encoder.") for n in names) or not any(n.startswith("decoder.") for n in names):
        return None
    # SD1 and SDXL latents have 4 channels; an SD3 or Flux VAE (16) would only fail at the worker
    conv_in = next((info for n, info in tensors.items() if n.endswith("decoder.conv_in.weight")), None)
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != 4:
        raise FamilyUnsupported(f"a VAE of {conv_in.shape[1]} latent channels; SD1 and SDXL VAEs have 4",
                                details={"latent_channels": conv_in.shape[1]})
    return "diffusers" if any(".up_blocks." in n or ".down_blocks." in n for n in names) else "ldm"


def inspect_file(path: str | Path, *, declared_kind: ResourceKind | str | None = None,
                 declared_family: str | None = None) -> Inspection:
    """Check, classify and hash a file. A declared kind or family that the keys contradict is refused;
    a family the keys do not tell is taken from the declaration (and refused without one)."""
    path = Path(path)
    header = read_header(path)
    tensors = header.tensors
    vectors = None
    if any(n.startswith(_CHECKPOINT_PREFIX) for n in tensors):
        kind, fmt, layout, family = ResourceKind.checkpoint, "checkpoint", "ldm", _detect_checkpoint_family(tensors)
    elif (emb := _embedding(tensors)) is not None:
        kind, fmt, layout = ResourceKind.embedding, "embedding", "embedding"
        family, vectors = emb
    elif (vae_layout := _vae_layout(tensors)) is not None:
        kind, fmt, layout, family = ResourceKind.vae, "vae", vae_layout, None
    elif any(_LORA_WEIGHT.search(n) or _LOHA.search(n) or _LOKR.search(n) for n in tensors):
        kind = ResourceKind.lora
        fmt, layout = _lora_format(tensors)
        family = _detect_lora_family(tensors)
    else:
        raise ResourceKindUnknown("not a checkpoint (LDM single file), LoRA, textual inversion or VAE: "
                                  f"e.g. {next(iter(tensors))!r}")
    if declared_kind is not None and ResourceKind(declared_kind) is not kind:
        raise ResourceKindMismatch(f"declared a {ResourceKind(declared_kind).value}, but the file is a {kind.value}",
                                   details={"declared": ResourceKind(declared_kind).value, "detected": kind.value})
    if family == "mixed":
        raise FamilyMismatch("the file mixes modules of more than one model family")
    if family is not None and family not in SUPPORTED_FAMILIES:
        raise FamilyUnsupported(f"the file is for {family}; this service runs {sorted(SUPPORTED_FAMILIES)}",
                                details={"detected": family})
    if declared_family is not None:
        if family is not None and family != declared_family:
            raise FamilyMismatch(f"declared {declared_family}, but the file's keys are {family}'s",
                                 details={"declared": declared_family, "detected": family})
        family = declared_family
    if family is None:
        raise FamilyUndetected("the model family cannot be told from the file; declare it")
    hashes = file_hashes(path)
    return Inspection(kind=kind, family=family, format=fmt, layout=layout, sha256=hashes.sha256,
                      tensor_sha256=hashes.tensor_sha256, size_bytes=path.stat().st_size, tensors=len(tensors),
                      metadata=header.metadata, vectors=vectors)


def inspect_or_refuse(path: str | Path, **kw: Any) -> Inspection:
    """`inspect_file` with safety's own not-a-safetensors error mapped to the service's."""
    try:
        return inspect_file(path, **kw)
    except NotSafetensors as exc:
        raise NotSafetensorsFile(exc.message) from exc

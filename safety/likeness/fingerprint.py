"""Weight fingerprints: per module, how much the file changes the layer (energy) and a small sketch of how.

Each canonical module m (see safety.lora_format) gets
  energy   e_m = ‖ΔW_m‖_F², exact: for a low-rank pair ΔW = s·U·D it is s²·Σ (UᵀU)∘(DDᵀ), so no ΔW is built;
  sketch   Pᵀ·ΔW_m·R (SKETCH×SKETCH), with fixed ±1 projections chosen by the matrix's sizes alone
           (SHAKE-256 of a version string), computed as s·(Pᵀ·U)·(D·R) for low-rank pairs and from the
           built ΔW for LoHa / LoKr / full / Tucker modules (cheap at adapter sizes).
Sketches are linear in ΔW, so the sketch of a request's combined update Σ strengthᵢ·ΔWᵢ is the same sum of
the files' sketches (`Fingerprint.combine`), and two fingerprints compare module by module (containment).
Names are canonical, so the fingerprint is the same in every layout; alpha and per-module rescales change
only energies and sketch lengths, re-factorisation and dtype casts nothing (or next to nothing).

A checkpoint's fingerprint is taken of its difference from the family's base (W − W₀ per weight), with the
same module names, so it compares with LoRA fingerprints too (a blocked LoRA merged into a checkpoint).
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from safety.errors import SafetyError
from safety.lora_format import (
    LoraFormatError,
    Module,
    canonical_module_name,
    is_adapter_key,
    read_lora,
)

FINGERPRINT_VERSION = "lfp2"
SKETCH = 8  # each module's sketch is SKETCH×SKETCH
DIM = SKETCH * SKETCH
# Modules of a blocklist entry whose energy is below this share of its largest module's are dropped
# (norm ratio 1e-3): padding such as ~1e-6 decoys never weighs in, and the stored entry stays small.
PRUNE_RATIO = 1e-6

_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.", "cond_stage_model.",
                        "first_stage_model.")
_DIFFUSERS_UNET_MARKERS = ("conv_in.weight", "time_embedding.linear_1.weight")


class FingerprintError(SafetyError):
    code = "fingerprint_invalid"


@functools.lru_cache(maxsize=512)
def _projection(dim: int, side: str) -> np.ndarray:
    """A fixed dim×SKETCH ±1 matrix derived from SHAKE-256, so it never changes across hosts."""
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(f"{FINGERPRINT_VERSION}:{side}:{dim}".encode()).digest(
        (dim * SKETCH + 7) // 8), dtype=np.uint8))[: dim * SKETCH]
    return (bits.astype(np.float64) * 2 - 1).reshape(dim, SKETCH)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def sketch_delta(delta: torch.Tensor | np.ndarray) -> tuple[np.ndarray, float]:
    """(sketch, energy) of a full ΔW matrix (out, in)."""
    d = delta if isinstance(delta, np.ndarray) else _numpy(delta)
    sketch = _projection(d.shape[0], "out").T @ d @ _projection(d.shape[1], "in")
    return sketch.reshape(-1).astype(np.float32), float(np.einsum("ij,ij->", d, d))


def sketch_module(module: Module) -> tuple[np.ndarray, float]:
    """(sketch, energy) of one adapter module, without building ΔW when it is a low-rank pair."""
    if not module.factored:
        return sketch_delta(module.delta())
    up, down = _numpy(module.up_matrix()), _numpy(module.down_matrix())
    s = module.scale
    sketch = s * ((_projection(module.out_features, "out").T @ up) @ (down @ _projection(module.in_features, "in")))
    energy = s * s * float(np.einsum("ij,ij->", up.T @ up, down @ down.T))
    return sketch.reshape(-1).astype(np.float32), energy


@dataclass(frozen=True)
class Fingerprint:
    """Per-module energies and sketches of one file (or of a request's combined update).

    `kind` is "lora", "checkpoint" (difference from the base whose tensor hash is `base`) or "combined".
    Serialised with `to_bytes` (the `fingerprint` column) and `meta` (the `fingerprint_meta` column).
    """

    names: tuple[str, ...]
    energy: np.ndarray  # (n,) float64, ‖ΔW_m‖_F² (an estimate from the sketch for kind "combined")
    sketches: np.ndarray  # (n, DIM) float32
    kind: str = "lora"
    base: str | None = None
    version: str = FINGERPRINT_VERSION

    @property
    def modules(self) -> int:
        return len(self.names)

    @property
    def empty(self) -> bool:
        return not self.names

    @property
    def meta(self) -> dict:
        return {"version": self.version, "modules": self.modules, "sketch": SKETCH, "kind": self.kind,
                "base": self.base}

    def to_bytes(self) -> bytes:
        names = "\n".join(self.names).encode()
        return (struct.pack("<II", self.modules, len(names)) + names + self.energy.astype("<f8").tobytes()
                + self.sketches.astype("<f4").tobytes())

    @classmethod
    def from_bytes(cls, blob: bytes, meta: Mapping) -> Fingerprint:
        if meta.get("version") != FINGERPRINT_VERSION:
            raise FingerprintError(f"fingerprint version {meta.get('version')!r} is not {FINGERPRINT_VERSION!r}",
                                   code="fingerprint_version")
        try:
            n, name_len = struct.unpack_from("<II", blob)
            names = tuple(blob[8 : 8 + name_len].decode().split("\n")) if n else ()
            off = 8 + name_len
            energy = np.frombuffer(blob, dtype="<f8", count=n, offset=off).astype(np.float64)
            sketches = np.frombuffer(blob, dtype="<f4", count=n * DIM, offset=off + 8 * n).reshape(n, DIM)
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise FingerprintError(f"stored fingerprint is corrupt: {exc}") from exc
        if len(names) != n or off + 8 * n + 4 * n * DIM != len(blob):
            raise FingerprintError("stored fingerprint is corrupt (sizes do not add up)")
        return cls(names, energy, sketches.astype(np.float32), kind=str(meta.get("kind", "lora")),
                   base=meta.get("base"))

    @functools.cached_property
    def digest(self) -> bytes:
        """A hash of everything the fingerprint holds (what the blocklist caches single-file verdicts by)."""
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{self.version}|{self.kind}|{self.base}|".encode() + "\n".join(self.names).encode())
        h.update(np.ascontiguousarray(self.energy, dtype="<f8").tobytes())
        h.update(np.ascontiguousarray(self.sketches, dtype="<f4").tobytes())
        return h.digest()

    def significant(self, ratio: float = PRUNE_RATIO) -> Fingerprint:
        """Without modules whose energy is below `ratio` × the largest module's (what an entry stores)."""
        if self.empty:
            return self
        keep = np.flatnonzero(self.energy >= ratio * float(self.energy.max()))
        if len(keep) == self.modules:
            return self
        return Fingerprint(tuple(self.names[i] for i in keep), self.energy[keep], self.sketches[keep],
                           kind=self.kind, base=self.base)

    @classmethod
    def combine(cls, parts: Sequence[tuple[Fingerprint, float]]) -> Fingerprint:
        """The fingerprint of Σ strengthᵢ·ΔWᵢ: sketches add per module (they are linear in ΔW); the energy
        is estimated from the combined sketch (E‖Pᵀ·A·R‖² = DIM·‖A‖²)."""
        rows: dict[str, int] = {}
        ids = [np.fromiter((rows.setdefault(n, len(rows)) for n in fp.names), dtype=np.int64, count=fp.modules)
               for fp, _ in parts]
        acc = np.zeros((len(rows), DIM), dtype=np.float64)
        for (fp, strength), idx in zip(parts, ids, strict=True):
            acc[idx] += strength * fp.sketches.astype(np.float64)  # names are unique within one fingerprint
        names = tuple(sorted(rows))
        sketches = acc[[rows[n] for n in names]] if names else acc
        return cls(names, (sketches**2).sum(1) / DIM, sketches.astype(np.float32), kind="combined")

    def similarity(self, other: Fingerprint) -> float:
        """The share of this fingerprint's energy that `other` reproduces (asymmetric; see containment)."""
        from safety.likeness.containment import containment

        return containment(self, other)


def _finish(sketched: Iterable[tuple[str, np.ndarray, float]], kind: str, base: str | None = None) -> Fingerprint:
    rows = sorted((n, s, e) for n, s, e in sketched if e > 0)  # an all-zero module changes nothing
    if not rows:
        return Fingerprint((), np.zeros(0), np.zeros((0, DIM), dtype=np.float32), kind=kind, base=base)
    names, sketches, energy = zip(*rows, strict=True)
    return Fingerprint(tuple(names), np.asarray(energy, dtype=np.float64), np.stack(sketches).astype(np.float32),
                       kind=kind, base=base)


def fingerprint_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Fingerprint:
    """The fingerprint of an adapter state dict (any layout and kind safety.lora_format reads)."""
    out = []
    with torch.no_grad():
        for module in read_lora(state_dict, metadata).values():
            sketch, energy = sketch_module(module)
            if not (np.isfinite(energy) and np.isfinite(sketch).all()):
                raise LoraFormatError(f"module {module.name!r} holds non-finite weights (or its ΔW overflows)")
            out.append((module.name, sketch, energy))
    return _finish(out, "lora")


def checkpoint_weights(keys: Iterable[str]) -> dict[str, str]:
    """Canonical module name -> checkpoint key, for every weight a fingerprint covers (".weight" tensors;
    OpenCLIP's fused `in_proj_weight` maps to the `<name>:q|k|v` thirds)."""
    out: dict[str, str] = {}
    for key in keys:
        if key.endswith(".in_proj_weight"):  # named as its sibling out_proj is, with q/k/v for out
            attn = canonical_module_name(key.removesuffix(".in_proj_weight") + ".out_proj").removesuffix("_out_proj")
            for i, part in enumerate("qkv"):
                out[f"{attn}_{part}_proj"] = f"{key}:{i}"
        elif key.endswith(".weight"):
            out[canonical_module_name(key.removesuffix(".weight"))] = key
    return out


def _checkpoint_tensor(tensors: Mapping[str, torch.Tensor], ref: str) -> torch.Tensor:
    key, _, third = ref.partition(":")
    t = tensors[key]
    if third:
        t = t.chunk(3, dim=0)[int(third)]
    return t


def fingerprint_checkpoint(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                           base_id: str) -> Fingerprint:
    """The fingerprint of a checkpoint's difference from its family's base (2-D and 4-D weights present
    in both with the same shape; biases and norms are left out). Raises when the two do not belong to one
    architecture (fewer than 90 % of the checkpoint's weights found in the base)."""
    mine, theirs = checkpoint_weights(tensors.keys()), checkpoint_weights(base.keys())
    out, matched, considered = [], 0, 0
    with torch.no_grad():
        for name, ref in mine.items():
            w = _checkpoint_tensor(tensors, ref)
            if w.ndim not in (2, 4):
                continue
            considered += 1
            if name not in theirs:
                continue
            w0 = _checkpoint_tensor(base, theirs[name])
            if w0.shape != w.shape:
                continue
            matched += 1
            delta = _numpy(w).reshape(w.shape[0], -1) - _numpy(w0).reshape(w.shape[0], -1)
            if not np.isfinite(delta).all():
                raise FingerprintError(f"checkpoint weight {ref!r} holds non-finite values")
            sketch, energy = sketch_delta(delta)
            out.append((name, sketch, energy))
    if considered == 0 or matched < 0.9 * considered:
        raise FingerprintError(f"the checkpoint shares only {matched} of its {considered} weights with the "
                               f"registered base: not that base's family", code="likeness_base_mismatch")
    return _finish(out, "checkpoint", base=base_id)


def resource_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """"lora" (any adapter keys), "checkpoint", "embedding" (textual inversion: a few ≤2-D tensors) or
    "unknown", from tensor names and shapes alone."""
    keys = list(shapes)
    if any(is_adapter_key(k) for k in keys):
        return "lora"
    if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys) or all(m in shapes for m in _DIFFUSERS_UNET_MARKERS):
        return "checkpoint"
    if 0 < len(keys) <= 16 and all(len(s) <= 2 for s in shapes.values()):
        return "embedding"
    return "unknown"

"""The likeness blocklist: LoRAs that reproduce a real person are never loaded.

A resource matches an entry by (a) whole-file SHA-256, (b) tensor-payload SHA-256 (survives metadata
edits) or (c) a weight fingerprint. The fingerprint looks only at each module's ΔW = scale·up·down,
sketched as Pᵀ·ΔW·R with fixed ±1 projections chosen by the matrix's shape alone, computed as
(Pᵀ·up)·(down·R) so no ΔW is ever materialised. Each module's sketch is normalised and added into a
bucket picked by its shape. So the fingerprint is the same after renaming keys or converting between
kohya/diffusers/PEFT layouts (names only pair up with down), after changing alpha with a compensating
scale or any per-module rescale, after re-factorising ΔW at another rank, and nearly the same after
dtype casts or small noise. Fingerprints compare by cosine similarity over the buckets both use; a
negated LoRA (usable at strength -1) matches too, so the absolute value is compared.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from safety.audit_log import AuditLog
from safety.errors import SafetyError
from safety.hashing import FileHashes, Source, file_hashes, load_tensors
from safety.lora_format import LoraFormatError, read_lora
from safety.store import LikenessEntry

__all__ = [
    "BlocklistEntry",
    "Fingerprint",
    "LikenessBlocklist",
    "LikenessConfig",
    "LikenessMatch",
    "PreparedResource",
    "file_hashes",
    "fingerprint_lora",
]

FINGERPRINT_VERSION = "lfp1"
SKETCH = 8  # each module's sketch is SKETCH×SKETCH
BUCKETS = 16
DIM = SKETCH * SKETCH

SessionFactory = Callable[[], Session]


class LikenessConfig(BaseModel):
    """Thresholds (configs/safety/likeness.yaml)."""

    model_config = ConfigDict(extra="forbid")

    fingerprint_threshold: float = Field(0.9, gt=0, le=1, description="|cosine| at or above which weights match")
    min_overlap: float = Field(
        0.5, gt=0, le=1, description="share of each side's fingerprint energy in buckets both use, for a match"
    )

    @classmethod
    def load(cls, path: str | Path) -> LikenessConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


@functools.lru_cache(maxsize=256)
def _projection(dim: int, side: str) -> torch.Tensor:
    """A fixed dim×SKETCH ±1 matrix derived from SHAKE-256, so it never changes across versions or hosts."""
    bits = np.unpackbits(np.frombuffer(hashlib.shake_256(f"{FINGERPRINT_VERSION}:{side}:{dim}".encode()).digest(
        (dim * SKETCH + 7) // 8), dtype=np.uint8))[: dim * SKETCH]
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(dim, SKETCH)


def _bucket(out_features: int, in_features: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{out_features}x{in_features}".encode()).digest()[:4], "little") % BUCKETS


@dataclass(frozen=True)
class Fingerprint:
    """BUCKETS × DIM float32 sums of normalised module sketches; serialisable with to_bytes/meta."""

    buckets: np.ndarray
    modules: int
    version: str = FINGERPRINT_VERSION

    @property
    def empty(self) -> bool:
        return self.modules == 0

    @property
    def meta(self) -> dict:
        return {"version": self.version, "modules": self.modules, "buckets": BUCKETS, "sketch": SKETCH}

    def to_bytes(self) -> bytes:
        return self.buckets.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, meta: Mapping) -> Fingerprint:
        if meta.get("version") != FINGERPRINT_VERSION:
            raise SafetyError(f"fingerprint version {meta.get('version')!r} is not {FINGERPRINT_VERSION!r}",
                              code="fingerprint_version")
        arr = np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(BUCKETS, DIM)
        return cls(buckets=arr, modules=int(meta.get("modules", 0)))

    def similarity(self, other: Fingerprint, min_overlap: float = 0.5) -> float:
        """|cosine| over shared buckets (0 when the overlap is below `min_overlap` either way)."""
        return float(_Stack.of(other.buckets[None]).similarities(self, min_overlap)[0])


def fingerprint_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Fingerprint:
    """The weight fingerprint of a LoRA state dict (any layout; tensors on any device)."""
    acc = torch.zeros(BUCKETS, DIM, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for module in read_lora(state_dict, metadata).values():
            up, down = module.up_matrix(), module.down_matrix()
            p = _projection(module.out_features, "out").to(up.device)
            r = _projection(module.in_features, "in").to(down.device)
            sketch = (p.T @ up.float()) @ (down.float() @ r)
            norm = torch.linalg.vector_norm(sketch)
            if not torch.isfinite(norm):
                raise LoraFormatError(f"module {module.name!r} holds non-finite weights")
            if norm == 0:
                continue  # an untrained (all-zero) module changes nothing
            acc[_bucket(module.out_features, module.in_features)] += (sketch / norm).reshape(-1).double().cpu()
            count += 1
    return Fingerprint(buckets=acc.float().numpy(), modules=count)


@dataclass(frozen=True)
class _Stack:
    """N fingerprints laid out bucket-major, so matching reads only the buckets a query uses."""

    vectors: np.ndarray  # (BUCKETS, N, DIM)
    energy: np.ndarray  # (BUCKETS, N): squared norm of each bucket
    total: np.ndarray  # (N,)

    @classmethod
    def of(cls, buckets: np.ndarray) -> _Stack:
        """From fingerprints stacked as (N, BUCKETS, DIM)."""
        energy = (buckets**2).sum(-1).T
        return cls(np.ascontiguousarray(buckets.transpose(1, 0, 2)), np.ascontiguousarray(energy), energy.sum(0))

    @classmethod
    def empty(cls) -> _Stack:
        return cls.of(np.zeros((0, BUCKETS, DIM), dtype=np.float32))

    def __len__(self) -> int:
        return self.vectors.shape[1]

    def concat(self, other: _Stack) -> _Stack:
        return _Stack(np.concatenate([self.vectors, other.vectors], axis=1),
                      np.concatenate([self.energy, other.energy], axis=1), np.concatenate([self.total, other.total]))

    def similarities(self, query: Fingerprint, min_overlap: float) -> np.ndarray:
        """|cosine| of `query` with each fingerprint over the buckets both use; 0 where those shared
        buckets hold less than `min_overlap` of either side's energy."""
        n = len(self)
        if n == 0 or query.empty:
            return np.zeros(n, dtype=np.float32)
        q = query.buckets
        q_energy = (q**2).sum(-1)
        dots = np.zeros(n, dtype=np.float32)
        q_shared = np.zeros(n, dtype=np.float32)
        e_shared = np.zeros(n, dtype=np.float32)
        # One contiguous matrix-vector product per bucket; einsum's own loop rather than a threaded BLAS
        # call, which is no faster at this size and far slower when the host's cores are oversubscribed.
        for b in np.flatnonzero(q_energy):
            dots += np.einsum("nd,d->n", self.vectors[b], q[b])
            q_shared += (self.energy[b] > 0) * q_energy[b]
            e_shared += self.energy[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.abs(dots) / np.sqrt(q_shared * e_shared)
            overlap = np.minimum(q_shared / q_energy.sum(), e_shared / self.total)
        return np.where((overlap >= min_overlap) & np.isfinite(cos), cos, 0.0).astype(np.float32)


@dataclass(frozen=True)
class LikenessMatch:
    entry_id: int
    person: str
    method: str  # "sha256" | "tensor_sha256" | "fingerprint"
    similarity: float
    source: str = ""
    reason: str = ""

    @property
    def rule_id(self) -> str:
        """The rule id audit rows and refusals carry, e.g. `likeness.fingerprint`."""
        return f"likeness.{self.method}"

    def to_dict(self) -> dict:
        return {"entry_id": self.entry_id, "person": self.person, "method": self.method, "rule_id": self.rule_id,
                "similarity": round(self.similarity, 6), "source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class BlocklistEntry:
    id: int
    person: str
    reason: str
    source: str
    created_by: str
    resource_id: str | None
    sha256: str
    tensor_sha256: str | None
    fingerprint_modules: int
    created_at: str

    @classmethod
    def of(cls, r: LikenessEntry) -> BlocklistEntry:
        return cls(id=r.id, person=r.person, reason=r.reason, source=r.source, created_by=r.created_by,
                   resource_id=r.resource_id, sha256=r.sha256, tensor_sha256=r.tensor_sha256,
                   fingerprint_modules=int((r.fingerprint_meta or {}).get("modules", 0)),
                   created_at=r.created_at.isoformat() if r.created_at else "")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PreparedResource:
    """Hashes and fingerprint of one resource, computed before any database write."""

    hashes: FileHashes
    fingerprint: Fingerprint | None


# What the in-memory index needs of each row (plain rows load much faster than ORM objects).
_INDEX_COLUMNS = (LikenessEntry.id, LikenessEntry.person, LikenessEntry.source, LikenessEntry.reason, LikenessEntry.sha256,
                  LikenessEntry.tensor_sha256, LikenessEntry.fingerprint, LikenessEntry.fingerprint_meta)


@dataclass
class _Index:
    """The in-memory copy of the blocklist: hash dicts and one stacked fingerprint matrix."""

    count: int = 0
    max_id: int = 0
    info: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (person, source, reason)
    by_sha: dict[str, int] = field(default_factory=dict)
    by_tensor_sha: dict[str, int] = field(default_factory=dict)
    fp_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fp: _Stack = field(default_factory=_Stack.empty)

    def extend(self, rows: Sequence[Row]) -> None:
        """Add rows selected with `_INDEX_COLUMNS`."""
        new_ids, new_fps = [], []
        for row in rows:
            self.info[row.id] = (row.person, row.source, row.reason)
            self.by_sha.setdefault(row.sha256, row.id)
            if row.tensor_sha256:
                self.by_tensor_sha.setdefault(row.tensor_sha256, row.id)
            if row.fingerprint is not None and (row.fingerprint_meta or {}).get("modules"):
                new_ids.append(row.id)
                new_fps.append(Fingerprint.from_bytes(row.fingerprint, row.fingerprint_meta).buckets)
            self.max_id = max(self.max_id, row.id)
        self.count += len(rows)
        if new_fps:
            self.fp_ids = np.concatenate([self.fp_ids, np.asarray(new_ids, dtype=np.int64)])
            self.fp = self.fp.concat(_Stack.of(np.stack(new_fps)))


class LikenessBlocklist:
    """The blocklist in the database, with an in-memory index revalidated on every check.

    Each check costs one `count(*), max(id)` query; entries added by any process are picked up
    on the next check without a restart.
    """

    def __init__(self, session_factory: SessionFactory, config: LikenessConfig | None = None,
                 audit_log: AuditLog | None = None):
        self._sessions = session_factory
        self.config = config or LikenessConfig()
        self.audit = audit_log
        self._index = _Index()
        self._lock = threading.Lock()

    # ---- adding -------------------------------------------------------------------------------
    @staticmethod
    def prepare(src: Source) -> PreparedResource:
        """Hash and fingerprint a safetensors file; raises NotSafetensors / LoraFormatError."""
        hashes = file_hashes(src)
        tensors, metadata = load_tensors(src)
        fp = fingerprint_lora(tensors, metadata)
        return PreparedResource(hashes=hashes, fingerprint=None if fp.empty else fp)

    @staticmethod
    def insert(session: Session, prepared: PreparedResource, *, person: str, reason: str, source: str = "",
               created_by: str = "", resource_id: str | None = None) -> LikenessEntry:
        """Add a prepared entry inside the caller's transaction."""
        if not person.strip():
            raise SafetyError("a likeness entry needs the person's name", code="person_required")
        fp = prepared.fingerprint
        row = LikenessEntry(
            sha256=prepared.hashes.sha256,
            tensor_sha256=prepared.hashes.tensor_sha256,
            fingerprint=fp.to_bytes() if fp else None,
            fingerprint_meta=fp.meta if fp else {},
            person=person.strip(),
            reason=reason,
            source=source,
            created_by=created_by,
            resource_id=resource_id,
        )
        session.add(row)
        session.flush()
        return row

    def add(self, src: Source, person: str, reason: str, source: str = "", created_by: str = "",
            resource_id: str | None = None) -> int:
        """Blocklist a file; effective for every later check. Returns the entry id."""
        prepared = self.prepare(src)
        with self._sessions() as s, s.begin():
            row = self.insert(s, prepared, person=person, reason=reason, source=source, created_by=created_by,
                              resource_id=resource_id)
            if self.audit is not None:
                self.audit.append("likeness", "add", subject=[row.sha256], user_id=created_by or None,
                                  details={"entry_id": row.id, "person": row.person, "source": source,
                                           "resource_id": resource_id}, session=s)
            return row.id

    # ---- checking -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the in-memory index up to date with the table (cheap when nothing changed)."""
        with self._sessions() as s:
            count, max_id = s.execute(select(func.count(LikenessEntry.id), func.max(LikenessEntry.id))).one()
            count, max_id = int(count or 0), int(max_id or 0)
            with self._lock:
                idx = self._index
                if (count, max_id) == (idx.count, idx.max_id):
                    return
                rows = s.execute(select(*_INDEX_COLUMNS).where(LikenessEntry.id > idx.max_id).order_by(LikenessEntry.id)).all()
                if idx.count + len(rows) != count:  # rows were removed: rebuild from scratch
                    idx = _Index()
                    rows = s.execute(select(*_INDEX_COLUMNS).order_by(LikenessEntry.id)).all()
                idx.extend(rows)
                self._index = idx

    def _match_hashes(self, idx: _Index, sha256: str | None, tensor_sha256: str | None) -> LikenessMatch | None:
        for method, table, value in (("sha256", idx.by_sha, sha256), ("tensor_sha256", idx.by_tensor_sha, tensor_sha256)):
            if value and value in table:
                return self._match(idx, table[value], method, 1.0)
        return None

    @staticmethod
    def _match(idx: _Index, entry_id: int, method: str, similarity: float) -> LikenessMatch:
        person, source, reason = idx.info[entry_id]
        return LikenessMatch(entry_id=entry_id, person=person, method=method, similarity=similarity,
                             source=source, reason=reason)

    def match_fingerprint(self, fp: Fingerprint, *, refresh: bool = True) -> LikenessMatch | None:
        """The most similar entry at or above the threshold, or None."""
        if refresh:
            self.refresh()
        idx = self._index
        sims = idx.fp.similarities(fp, self.config.min_overlap)
        if len(sims) == 0:
            return None
        best = int(np.argmax(sims))
        if sims[best] < self.config.fingerprint_threshold:
            return None
        return self._match(idx, int(idx.fp_ids[best]), "fingerprint", float(sims[best]))

    def check_hashes(self, sha256: str | None = None, tensor_sha256: str | None = None) -> LikenessMatch | None:
        """Match known hashes (e.g. from the resource registry) without reading the file."""
        self.refresh()
        return self._match_hashes(self._index, sha256, tensor_sha256)

    def check(self, src: Source) -> LikenessMatch | None:
        """Match a safetensors file (path or bytes). Raises NotSafetensors / LoraFormatError: fail closed."""
        hashes = file_hashes(src)
        hit = self.check_hashes(hashes.sha256, hashes.tensor_sha256)
        if hit is not None:
            return hit
        tensors, metadata = load_tensors(src)
        return self.match_fingerprint(fingerprint_lora(tensors, metadata), refresh=False)

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> LikenessMatch | None:
        """Match an already-loaded LoRA by its weights."""
        return self.match_fingerprint(fingerprint_lora(state_dict, metadata))

    # ---- listing ------------------------------------------------------------------------------
    def list(self) -> list[BlocklistEntry]:
        with self._sessions() as s:
            return [BlocklistEntry.of(r) for r in s.scalars(select(LikenessEntry).order_by(LikenessEntry.id))]

    def get(self, entry_id: int) -> BlocklistEntry | None:
        with self._sessions() as s:
            row = s.get(LikenessEntry, entry_id)
            return BlocklistEntry.of(row) if row is not None else None

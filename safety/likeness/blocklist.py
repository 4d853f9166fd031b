"""The likeness blocklist in the database, and the checks every caller runs against it.

An entry blocks by (a) whole-file SHA-256, (b) tensor-payload SHA-256 (survives metadata edits) and (c) a
weight fingerprint (safety.likeness.fingerprint), matched by containment (safety.likeness.containment):
a candidate matches when it reproduces at least `containment_threshold` of the entry's update.
Single-file verdicts are cached for as long as the entries do not change, so a request whose files were
checked before (at upload) pays only for scoring its combined update.

What can be an entry:
  LoRA (every layout and kind safety.lora_format reads)   hashes + fingerprint
  checkpoint, with its family's base registered           hashes + fingerprint of its difference from the base
  checkpoint without a base, or any unrecognised file      refused at add time (`likeness_base_required`,
                                                           `likeness_kind_unsupported`) unless the caller asks
                                                           for a hash-only entry explicitly (`hash_only=True`)
  textual-inversion embedding                              hashes only (by design: a few vectors)

Checks: `check(file)` for one file, `check_combined([(resource, strength), ...])` for a whole request
(each file alone, then Σ strengthᵢ·ΔWᵢ together), `check_hashes` for known hashes.

Old fingerprints (another FINGERPRINT_VERSION) are never silently ignored: their hashes still match, and
every check that needs weights raises `likeness_fingerprint_stale` (fail closed) until each such entry is
re-fingerprinted from its file (`refingerprint`) or removed; `stale_entries()` lists them.

A little past 450 lines on purpose: the in-memory index, its revalidation and every check that reads it
share one lock and one refresh; split, a check could read an index another part had half rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Row, func, select
from sqlalchemy.orm import Session

from safety.audit_log import AuditLog
from safety.errors import RulesInvalid, SafetyError
from safety.hashing import FileHashes, SafetensorsFile, Source, file_hashes
from safety.likeness.containment import ContainmentIndex
from safety.likeness.fingerprint import (
    FINGERPRINT_VERSION,
    Fingerprint,
    FingerprintError,
    fingerprint_checkpoint,
    fingerprint_lora,
    resource_kind,
)
from safety.store import LikenessEntry

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]
BaseSource = Source | Mapping[str, torch.Tensor]

# A threshold above this lets a partial copy keeping three quarters of a blocked LoRA through; one
# below this starts to refuse unrelated LoRAs that merely share a base model's habits.
MAX_THRESHOLD = 0.75
MIN_THRESHOLD = 0.2


class LikenessConfig(BaseModel):
    """Thresholds (configs/safety/likeness.yaml). Values that would weaken the blocklist are refused at load."""

    model_config = ConfigDict(extra="forbid")

    containment_threshold: float = Field(
        0.4, description="share of a blocked entry's energy a candidate must reproduce to be refused")

    @field_validator("containment_threshold")
    @classmethod
    def _within_safe_range(cls, v: float) -> float:
        if not MIN_THRESHOLD <= v <= MAX_THRESHOLD:
            raise ValueError(f"must lie in [{MIN_THRESHOLD}, {MAX_THRESHOLD}]: above, partial copies of a blocked "
                             f"LoRA pass; below, unrelated LoRAs are refused (got {v})")
        return v

    @classmethod
    def load(cls, path: str | Path) -> LikenessConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise RulesInvalid(f"likeness config {path}: {exc}") from exc


@dataclass(frozen=True)
class LikenessMatch:
    entry_id: int
    person: str
    method: str  # "sha256" | "tensor_sha256" | "fingerprint" | "combined"
    similarity: float  # 1.0 for hashes; the containment score for weights
    source: str = ""
    reason: str = ""
    parts: tuple[int, ...] = ()  # for check_combined: positions of the request's resources involved

    @property
    def rule_id(self) -> str:
        """The rule id audit rows and refusals carry, e.g. `likeness.fingerprint`."""
        return f"likeness.{self.method}"

    def to_dict(self) -> dict:
        return {"entry_id": self.entry_id, "person": self.person, "method": self.method, "rule_id": self.rule_id,
                "similarity": round(self.similarity, 6), "source": self.source, "reason": self.reason,
                "parts": list(self.parts)}


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
    kind: str = "lora"
    fingerprint_version: str | None = None
    fingerprint_stale: bool = False

    @classmethod
    def of(cls, r: LikenessEntry) -> BlocklistEntry:
        meta = r.fingerprint_meta or {}
        version = meta.get("version") if r.fingerprint is not None else None
        return cls(id=r.id, person=r.person, reason=r.reason, source=r.source, created_by=r.created_by,
                   resource_id=r.resource_id, sha256=r.sha256, tensor_sha256=r.tensor_sha256,
                   fingerprint_modules=int(meta.get("modules", 0)),
                   created_at=r.created_at.isoformat() if r.created_at else "", kind=str(meta.get("kind", "lora")),
                   fingerprint_version=version, fingerprint_stale=version not in (None, FINGERPRINT_VERSION))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PreparedResource:
    """Hashes, kind and fingerprint of one file, computed before any database write (or once at upload,
    then reused by every request that names the file)."""

    hashes: FileHashes
    fingerprint: Fingerprint | None  # None: not a kind that can be fingerprinted (or no base registered)
    kind: str = "lora"  # "lora" | "checkpoint" | "embedding" | "unknown"


# What the in-memory index needs of each row (plain rows load much faster than ORM objects).
_INDEX_COLUMNS = (LikenessEntry.id, LikenessEntry.person, LikenessEntry.source, LikenessEntry.reason,
                  LikenessEntry.sha256, LikenessEntry.tensor_sha256, LikenessEntry.fingerprint,
                  LikenessEntry.fingerprint_meta)


@dataclass
class _Index:
    """The in-memory copy of the blocklist: hash dicts and the containment index of fingerprints."""

    count: int = 0
    max_id: int = 0
    info: dict[int, tuple[str, str, str]] = field(default_factory=dict)  # id -> (person, source, reason)
    by_sha: dict[str, int] = field(default_factory=dict)
    by_tensor_sha: dict[str, int] = field(default_factory=dict)
    fp_ids: list[int] = field(default_factory=list)
    fp: ContainmentIndex = field(default_factory=ContainmentIndex)
    checkpoint_bases: set[str] = field(default_factory=set)  # bases of checkpoint entries' fingerprints
    stale: list[int] = field(default_factory=list)
    # Single-file verdicts against exactly these entries (a new _Index starts empty): fingerprint digest ->
    # (entry position, best score) or None (keyed by the weights as read, never by a file hash: the same
    # tensor payload under other names is another fingerprint). A request re-uses them and scores only its combined update afresh.
    verdicts: dict[bytes, tuple[int, float] | None] = field(default_factory=dict)

    def extend(self, rows: Sequence[Row]) -> None:
        """Add rows selected with `_INDEX_COLUMNS`."""
        new_fps = []
        for row in rows:
            self.info[row.id] = (row.person, row.source, row.reason)
            self.by_sha.setdefault(row.sha256, row.id)
            if row.tensor_sha256:
                self.by_tensor_sha.setdefault(row.tensor_sha256, row.id)
            meta = row.fingerprint_meta or {}
            if row.fingerprint is not None and meta.get("version") != FINGERPRINT_VERSION:
                self.stale.append(row.id)
            elif row.fingerprint is not None and meta.get("modules"):
                fp = Fingerprint.from_bytes(row.fingerprint, meta)
                self.fp_ids.append(row.id)
                new_fps.append(fp)
                if fp.kind == "checkpoint" and fp.base:
                    self.checkpoint_bases.add(fp.base)
            self.max_id = max(self.max_id, row.id)
        self.count += len(rows)
        if new_fps:
            self.fp = self.fp.extend(new_fps)
        if self.stale:
            log.warning("likeness blocklist: %d entries hold fingerprints of an older version (ids %s); weight "
                        "checks refuse until they are re-fingerprinted", len(self.stale), self.stale[:20])


_MAX_VERDICTS = 100_000
_UNKNOWN = object()


def _state_dict_id(state_dict: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_family(keys: Sequence[str]) -> str | None:
    """"sdxl" or "sd1" for a single-file checkpoint, from its key names; None when unclear."""
    if any(k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd1"
    return None


class LikenessBlocklist:
    """The blocklist in the database, with an in-memory index revalidated on every check.

    Each check costs one `count(*), max(id)` query; entries added by any process are picked up on the next
    check without a restart. Bases for checkpoint fingerprints are registered per process (`register_base`).
    """

    def __init__(self, session_factory: SessionFactory, config: LikenessConfig | None = None,
                 audit_log: AuditLog | None = None):
        self._sessions = session_factory
        self.config = config or LikenessConfig()
        self.audit = audit_log
        self._index = _Index()
        self._lock = threading.Lock()
        self._bases: dict[str, tuple[str, BaseSource]] = {}  # family -> (base id, file or state dict)

    # ---- bases ----------------------------------------------------------------------------------
    def register_base(self, family: str, base: BaseSource) -> str:
        """Register the base checkpoint of `family` (a safetensors path/bytes, or a loaded state dict), so
        checkpoints of that family are fingerprinted by their difference from it. Returns the base's id
        (its tensor-payload SHA-256, or a digest of the state dict's tensors)."""
        if isinstance(base, Mapping):
            base_id = _state_dict_id(base)
        else:
            base_id = file_hashes(base).tensor_sha256
        self._bases[family] = (base_id, base)
        return base_id

    def has_base(self, family: str) -> bool:
        """Whether checkpoints of `family` can be fingerprinted here (its base is registered)."""
        return family in self._bases

    def _fingerprint_checkpoint(self, tensors: SafetensorsFile, family: str | None) -> Fingerprint | None:
        family = family or checkpoint_family(list(tensors))
        if family not in self._bases:
            return None
        base_id, base = self._bases[family]
        if isinstance(base, Mapping):
            return fingerprint_checkpoint(tensors, base, base_id)
        with SafetensorsFile(base) as base_tensors:
            return fingerprint_checkpoint(tensors, base_tensors, base_id)

    # ---- adding ---------------------------------------------------------------------------------
    def prepare(self, src: Source, *, family: str | None = None, hashes: FileHashes | None = None) -> PreparedResource:
        """Hash (unless `hashes` are known), classify and fingerprint a safetensors file.
        Raises NotSafetensors / LoraFormatError / FingerprintError."""
        hashes = hashes or file_hashes(src)
        with SafetensorsFile(src) as tensors:
            kind = resource_kind(tensors.shapes)
            if kind == "lora":
                fp = fingerprint_lora({k: tensors[k] for k in tensors}, tensors.metadata)
            elif kind == "checkpoint":
                fp = self._fingerprint_checkpoint(tensors, family)
            else:
                fp = None
        return PreparedResource(hashes=hashes, fingerprint=fp, kind=kind)

    @staticmethod
    def insert(session: Session, prepared: PreparedResource, *, person: str, reason: str, source: str = "",
               created_by: str = "", resource_id: str | None = None, hash_only: bool = False) -> LikenessEntry:
        """Add a prepared entry inside the caller's transaction. A checkpoint without a fingerprint (no base
        registered for its family) or a file of unknown kind is refused unless `hash_only` says that a
        hash-only entry is meant."""
        if not person.strip():
            raise SafetyError("a likeness entry needs the person's name", code="person_required")
        fp = prepared.fingerprint
        if fp is None and not hash_only:
            if prepared.kind == "checkpoint":
                raise SafetyError("this checkpoint cannot be fingerprinted: no base is registered for its family "
                                  "(register one, or add a hash-only entry explicitly)", code="likeness_base_required")
            if prepared.kind == "unknown":
                raise SafetyError("the blocklist cannot fingerprint this kind of file (neither an adapter, a "
                                  "checkpoint nor an embedding)", code="likeness_kind_unsupported")
        stored = fp.significant() if fp is not None and not fp.empty else None
        row = LikenessEntry(
            sha256=prepared.hashes.sha256,
            tensor_sha256=prepared.hashes.tensor_sha256,
            fingerprint=stored.to_bytes() if stored else None,
            fingerprint_meta=stored.meta if stored else {"modules": 0, "kind": prepared.kind},
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
            resource_id: str | None = None, *, family: str | None = None, hash_only: bool = False) -> int:
        """Blocklist a file; effective for every later check. Returns the entry id."""
        prepared = self.prepare(src, family=family)
        with self._sessions() as s, s.begin():
            row = self.insert(s, prepared, person=person, reason=reason, source=source, created_by=created_by,
                              resource_id=resource_id, hash_only=hash_only)
            if self.audit is not None:
                self.audit.append("likeness", "add", subject=[row.sha256], user_id=created_by or None,
                                  details={"entry_id": row.id, "person": row.person, "source": source,
                                           "resource_id": resource_id, "kind": prepared.kind,
                                           "fingerprint_modules": row.fingerprint_meta.get("modules", 0)},
                                  session=s)
            return row.id

    def stale_entries(self) -> list[BlocklistEntry]:
        """Entries whose stored fingerprint is of an older version (re-fingerprint them with `refingerprint`)."""
        return [e for e in self.list() if e.fingerprint_stale]

    def refingerprint(self, entry_id: int, src: Source, *, family: str | None = None) -> BlocklistEntry:
        """Recompute an entry's fingerprint from its file, which must be the entry's own (same hash)."""
        prepared = self.prepare(src, family=family)
        with self._sessions() as s, s.begin():
            row = s.get(LikenessEntry, entry_id)
            if row is None:
                raise SafetyError(f"no likeness entry {entry_id}", code="likeness_entry_not_found")
            if prepared.hashes.sha256 != row.sha256 and prepared.hashes.tensor_sha256 != row.tensor_sha256:
                raise SafetyError(f"the file is not entry {entry_id}'s (hashes differ)", code="likeness_file_mismatch")
            fp = prepared.fingerprint.significant() if prepared.fingerprint and not prepared.fingerprint.empty else None
            row.fingerprint = fp.to_bytes() if fp else None
            row.fingerprint_meta = fp.meta if fp else {"modules": 0, "kind": prepared.kind}
            s.flush()
            entry = BlocklistEntry.of(row)
        with self._lock:
            self._index = _Index()  # an updated row does not change count or max id: rebuild on next check
        return entry

    # ---- checking -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the in-memory index up to date with the table (cheap when nothing changed)."""
        with self._sessions() as s:
            count, max_id = s.execute(select(func.count(LikenessEntry.id), func.max(LikenessEntry.id))).one()
            count, max_id = int(count or 0), int(max_id or 0)
            with self._lock:
                idx = self._index
                if (count, max_id) == (idx.count, idx.max_id):
                    return
                rows = s.execute(select(*_INDEX_COLUMNS).where(LikenessEntry.id > idx.max_id)
                                 .order_by(LikenessEntry.id)).all()
                if idx.count + len(rows) != count:  # rows were removed: rebuild from scratch
                    idx = _Index()
                    rows = s.execute(select(*_INDEX_COLUMNS).order_by(LikenessEntry.id)).all()
                else:
                    idx = _Index(idx.count, idx.max_id, dict(idx.info), dict(idx.by_sha), dict(idx.by_tensor_sha),
                                 list(idx.fp_ids), idx.fp, set(idx.checkpoint_bases), list(idx.stale))
                idx.extend(rows)
                self._index = idx

    def _weights_index(self) -> _Index:
        idx = self._index
        if idx.stale:
            raise SafetyError(f"{len(idx.stale)} blocklist entries hold fingerprints of an older version "
                              f"(ids {idx.stale[:10]}); re-fingerprint them before weights can be checked",
                              code="likeness_fingerprint_stale")
        return idx

    def _match_hashes(self, idx: _Index, sha256: str | None, tensor_sha256: str | None) -> LikenessMatch | None:
        for method, table, value in (("sha256", idx.by_sha, sha256), ("tensor_sha256", idx.by_tensor_sha, tensor_sha256)):
            if value and value in table:
                return self._match(idx, table[value], method, 1.0)
        return None

    @staticmethod
    def _match(idx: _Index, entry_id: int, method: str, similarity: float, parts: tuple[int, ...] = ()) -> LikenessMatch:
        person, source, reason = idx.info[entry_id]
        return LikenessMatch(entry_id=entry_id, person=person, method=method, similarity=similarity,
                             source=source, reason=reason, parts=parts)

    def _best(self, idx: _Index, scores: np.ndarray, method: str, parts: tuple[int, ...]) -> LikenessMatch | None:
        if len(scores) == 0:
            return None
        best = int(np.argmax(scores))
        return self._best_of(idx, best, float(scores[best]), method, parts)

    def _best_of(self, idx: _Index, pos: int, score: float, method: str, parts: tuple[int, ...]) -> LikenessMatch | None:
        if score < self.config.containment_threshold:
            return None
        return self._match(idx, idx.fp_ids[pos], method, score, parts)

    def match_fingerprint(self, fp: Fingerprint, *, refresh: bool = True) -> LikenessMatch | None:
        """The entry `fp` reproduces most (containment at or above the threshold), or None."""
        if refresh:
            self.refresh()
        idx = self._weights_index()
        return self._best(idx, idx.fp.scores([fp])[:, 0], "fingerprint", ())

    def check_hashes(self, sha256: str | None = None, tensor_sha256: str | None = None) -> LikenessMatch | None:
        """Match known hashes (e.g. from the resource registry) without reading the file."""
        self.refresh()
        return self._match_hashes(self._index, sha256, tensor_sha256)

    def check(self, src: Source, *, family: str | None = None) -> LikenessMatch | None:
        """Match one safetensors file (path or bytes): LoRA, checkpoint or embedding.
        Raises NotSafetensors / LoraFormatError / SafetyError: fail closed."""
        hashes = file_hashes(src)
        hit = self.check_hashes(hashes.sha256, hashes.tensor_sha256)
        if hit is not None:
            return hit
        prepared = self.prepare(src, family=family, hashes=hashes)
        return self.check_combined([(prepared, 1.0)], refresh=False)

    def check_checkpoint(self, src: Source, *, family: str | None = None) -> LikenessMatch | None:
        """`check` for a checkpoint (its hashes, then its difference from the registered base)."""
        return self.check(src, family=family)

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None = None) -> LikenessMatch | None:
        """Match an already-loaded LoRA by its weights."""
        return self.match_fingerprint(fingerprint_lora(state_dict, metadata))

    def check_combined(self, items: Sequence[tuple[PreparedResource | Fingerprint, float]], *,
                       refresh: bool = True) -> LikenessMatch | None:
        """Check the resources of one request together: every file's hashes, every fingerprint alone (any
        strength: a file is blocked whatever weight it is used at), then the combined update
        Σ strengthᵢ·ΔWᵢ of all of them (a checkpoint's difference from its base counts at strength 1).
        Returns the strongest match (hash matches first), or None. Raises when weights cannot be checked:
        a checkpoint whose base is not registered while checkpoint entries exist, or stale entries."""
        if refresh:
            self.refresh()
        idx = self._index
        fps: list[tuple[int, Fingerprint, float, bytes]] = []
        for i, (item, strength) in enumerate(items):
            if isinstance(item, PreparedResource):
                hit = self._match_hashes(idx, item.hashes.sha256, item.hashes.tensor_sha256)
                if hit is not None:
                    return replace(hit, parts=(i,))
                if item.kind == "checkpoint" and item.fingerprint is None and idx.checkpoint_bases:
                    raise SafetyError("a checkpoint cannot be checked against the blocklist's checkpoint entries: "
                                      "no base is registered for its family", code="likeness_base_missing")
                if item.fingerprint is not None and not item.fingerprint.empty:
                    fps.append((i, item.fingerprint, strength, item.fingerprint.digest))
            elif not item.empty:
                fps.append((i, item, strength, item.digest))
        if not fps:
            return None
        idx = self._weights_index()
        known = {key: v for _, _, _, key in fps if (v := idx.verdicts.get(key, _UNKNOWN)) is not _UNKNOWN}
        todo = [(i, fp, key) for i, fp, _, key in fps if key not in known]
        queries = [fp for _, fp, _ in todo]
        active = [(i, fp, s) for i, fp, s, _ in fps if s != 0]
        if len(active) > 1:
            queries.append(Fingerprint.combine([(fp, s) for _, fp, s in active]))
        scores = idx.fp.scores(queries)
        fresh = {}
        for j, (_, _, key) in enumerate(todo):
            best = int(np.argmax(scores[:, j])) if len(scores) else -1
            fresh[key] = (best, float(scores[best, j])) if best >= 0 else None
        verdicts = {**known, **fresh}
        if len(idx.verdicts) + len(fresh) > _MAX_VERDICTS:
            idx.verdicts.clear()
        idx.verdicts.update(fresh)
        hits = [self._best_of(idx, *verdicts[key], "fingerprint", (i,)) for i, _, _, key in fps if verdicts[key]]
        if len(queries) > len(todo):
            hits.append(self._best(idx, scores[:, -1], "combined", tuple(i for i, _, _ in active)))
        hits = [h for h in hits if h is not None]
        return max(hits, key=lambda h: h.similarity) if hits else None

    # ---- listing --------------------------------------------------------------------------------
    def list(self) -> list[BlocklistEntry]:
        with self._sessions() as s:
            return [BlocklistEntry.of(r) for r in s.scalars(select(LikenessEntry).order_by(LikenessEntry.id))]

    def get(self, entry_id: int) -> BlocklistEntry | None:
        with self._sessions() as s:
            row = s.get(LikenessEntry, entry_id)
            return BlocklistEntry.of(row) if row is not None else None


__all__ = ["BlocklistEntry", "FingerprintError", "LikenessBlocklist", "LikenessConfig", "LikenessMatch",
           "PreparedResource", "checkpoint_family"]

"""Containment: the share of a blocked entry's energy that a candidate reproduces, module by module.

For a blocked fingerprint B (modules m, energies e_m, sketches b_m) and a candidate C (sketches c_m):

    score(B, C) = max over σ ∈ {+1, −1} of  Σ_m w_m · max(0, σ·cos(b_m, c_m)),   w_m = ‖ΔB_m‖ / Σ_m ‖ΔB_m‖

  - weighted by the size of B's change to each module (‖ΔB_m‖_F = √e_m: one dominant module does not
    decide alone, and copying only the largest modules is not enough), so modules B hardly changes (decoys, padding) weigh nothing, and modules only
    C changes (anything added on other layers) are ignored: C containing B plus other things still scores 1;
  - per-module cosines, so a file that is B rescaled (globally or per module, alpha games) or re-factorised
    scores 1, and a partial copy scores the share of B's energy it keeps (three quarters of the modules:
    0.75; a rank truncation or 30–50 % noise: the cosine of what is left, per module);
  - one sign for all modules (σ), so a negated copy used at strength −1 matches, while modules that pull
    against B never count for it;
  - unrelated LoRAs score about 0.05 (independent 64-entry sketches have |cos| ≈ 1/8 per module, and only
    the positive side of one sign counts).
A request's combined update is scored the same way from `Fingerprint.combine` (sketches add linearly), so
a blocked LoRA split across files by modules, by rank, or as (B+U) at +1 and U at −1 scores 1 as a whole.

`ContainmentIndex` holds many entries laid out module-major (one small matrix per module name), so scoring
Q candidates against N entries costs one (n_m × DIM)·(DIM × Q) product per module the candidates touch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from safety.likeness.fingerprint import DIM, Fingerprint


def _weighted_units(fp: Fingerprint) -> np.ndarray:
    """Rows w_m · b_m/‖b_m‖ of a blocked fingerprint (w_m its module's share of the weight)."""
    norms = np.linalg.norm(fp.sketches.astype(np.float64), axis=1)
    w = np.sqrt(fp.energy)
    w /= w.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(norms[:, None] > 0, fp.sketches * (w / norms)[:, None], 0.0)
    return rows.astype(np.float32)


@dataclass(frozen=True)
class ContainmentIndex:
    """Blocked fingerprints, module-major. Immutable: `extend` returns a new index (readers never lock)."""

    size: int = 0
    vocab: dict[str, int] = field(default_factory=dict)
    rows: tuple[np.ndarray, ...] = ()  # per module id: positions of the entries that change it
    weights: tuple[np.ndarray, ...] = ()  # per module id: (n_m, DIM) float32 weighted unit sketches

    def extend(self, fps: Sequence[Fingerprint]) -> ContainmentIndex:
        """Entries appended at positions size, size+1, ... (each already pruned with `significant`)."""
        vocab = dict(self.vocab)
        new_rows: dict[int, list[int]] = {}
        new_weights: dict[int, list[np.ndarray]] = {}
        for pos, fp in enumerate(fps, start=self.size):
            if fp.empty:
                continue
            for name, row in zip(fp.names, _weighted_units(fp), strict=True):
                v = vocab.setdefault(name, len(vocab))
                new_rows.setdefault(v, []).append(pos)
                new_weights.setdefault(v, []).append(row)
        rows, weights = list(self.rows), list(self.weights)
        for _ in range(len(self.rows), len(vocab)):
            rows.append(np.zeros(0, dtype=np.int64))
            weights.append(np.zeros((0, DIM), dtype=np.float32))
        for v, positions in new_rows.items():
            rows[v] = np.concatenate([rows[v], np.asarray(positions, dtype=np.int64)])
            weights[v] = np.concatenate([weights[v], np.stack(new_weights[v])])
        return ContainmentIndex(self.size + len(fps), vocab, tuple(rows), tuple(weights))

    def scores(self, queries: Sequence[Fingerprint]) -> np.ndarray:
        """(entries, queries) containment scores of every entry in every query."""
        q = len(queries)
        pos = np.zeros((self.size, q), dtype=np.float32)
        neg = np.zeros((self.size, q), dtype=np.float32)
        if self.size == 0 or q == 0:
            return pos
        columns: dict[int, np.ndarray] = {}
        for j, fp in enumerate(queries):
            if fp.empty:
                continue
            norms = np.linalg.norm(fp.sketches, axis=1)
            for name, sketch, norm in zip(fp.names, fp.sketches, norms, strict=True):
                v = self.vocab.get(name)
                if v is not None and norm > 0:
                    columns.setdefault(v, np.zeros((DIM, q), dtype=np.float32))[:, j] = sketch / norm
        for v, cols in columns.items():
            d = self.weights[v] @ cols
            rows = self.rows[v]
            pos[rows] += np.maximum(d, 0)
            neg[rows] -= np.minimum(d, 0)
        return np.maximum(pos, neg)


def containment(blocked: Fingerprint, candidate: Fingerprint) -> float:
    """The share of `blocked`'s energy that `candidate` reproduces (0..1; see the module docstring)."""
    if blocked.empty:
        return 0.0
    return float(ContainmentIndex().extend([blocked.significant()]).scores([candidate])[0, 0])

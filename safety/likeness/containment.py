"""Containment: how much of a blocked entry's weight update a candidate reproduces, module by module.

For a blocked fingerprint B (modules m with update ΔB_m, sketch b_m) and a candidate C (sketches c_m):

    score(B, C) = max over σ ∈ {+1, −1} of  Σ_m w_m · max(0, σ·cos(b_m, c_m)),   w_m = ‖ΔB_m‖ / Σ_m ‖ΔB_m‖

  - weighted by the size of B's change to each module, so modules B hardly changes (decoys, padding)
    weigh nothing, and modules only C changes (anything added on other layers) are ignored: a C that
    contains B plus other things still scores 1 (norms rather than energies, so no single dominant
    module decides alone);
  - per-module cosines, so a file that is B rescaled (globally or per module, alpha games), re-factorised,
    cast or re-encoded as another adapter kind scores 1, and a partial copy scores the share it keeps:
    three quarters of the modules ≈ 0.75, the self-attention half of an attention LoRA ≈ 0.5, a rank
    truncation or 30–50 % noise the cosine of what is left (0.85–0.97, 0.79–0.91 in the tests);
  - one sign for all modules (σ), so a negated copy used at strength −1 matches, while modules that pull
    against B never count for it;
  - unrelated LoRAs score ≈ 0.05 (independent 64-entry sketches have |cos| ≈ 1/8 per module and only one
    sign's positive side counts), trained-alike ones sharing a component about the same.
A request's combined update is scored the same way from `Fingerprint.combine` (sketches add linearly), so
a blocked LoRA split across files by modules, by rank, or as (B+U) at +1 and U at −1 scores 1 as a whole.
The score is not a symmetric cosine: what C adds elsewhere never lowers it.

`ContainmentIndex` holds many entries as one dense module-major array, so scoring Q candidates against N
entries is one batched product (modules × [N × DIM]·[DIM × Q]): memory-bound, ~M·N·DIM floats read
(12 SDXL LoRAs against 1,000 SDXL-sized entries: under 20 ms on one core, see bench/likeness.py).
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
    """Blocked fingerprints as one dense (modules × entries × DIM) array of weighted unit sketches (zero where
    an entry does not change a module). Immutable: `extend` returns a new index, so readers never lock."""

    size: int = 0
    vocab: dict[str, int] = field(default_factory=dict)  # module name -> row
    weights: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, DIM), dtype=np.float32))

    def extend(self, fps: Sequence[Fingerprint]) -> ContainmentIndex:
        """Entries appended at positions size, size+1, ... (each already pruned with `significant`)."""
        vocab = dict(self.vocab)
        for fp in fps:
            for name in fp.names:
                vocab.setdefault(name, len(vocab))
        weights = np.zeros((len(vocab), self.size + len(fps), DIM), dtype=np.float32)
        weights[: len(self.vocab), : self.size] = self.weights
        for pos, fp in enumerate(fps, start=self.size):
            if not fp.empty:
                weights[[vocab[n] for n in fp.names], pos] = _weighted_units(fp)
        return ContainmentIndex(self.size + len(fps), vocab, weights)

    def scores(self, queries: Sequence[Fingerprint]) -> np.ndarray:
        """(entries, queries) containment scores of every entry in every query."""
        q = len(queries)
        if self.size == 0 or q == 0:
            return np.zeros((self.size, q), dtype=np.float32)
        cols = np.zeros((len(self.vocab), DIM, q), dtype=np.float32)  # unit candidate sketches, by module
        for j, fp in enumerate(queries):
            if fp.empty:
                continue
            ids = np.fromiter((self.vocab.get(n, -1) for n in fp.names), dtype=np.int64, count=fp.modules)
            norms = np.linalg.norm(fp.sketches, axis=1)
            ok = (ids >= 0) & (norms > 0)
            cols[ids[ok], :, j] = fp.sketches[ok] / norms[ok, None]
        present = np.flatnonzero(cols.any(axis=(1, 2)))
        weights = self.weights
        if len(present) < 0.75 * len(self.vocab):  # gather only when it saves much of the product
            weights, cols = weights[present], cols[present]
        dots = np.matmul(weights, cols)  # (modules, entries, queries): w_m · cos_m
        # max over σ of Σ_m max(0, σ·d_m) = (Σ_m |d_m| + |Σ_m d_m|) / 2
        return (np.abs(dots).sum(0) + np.abs(dots.sum(0))) / 2


def containment(blocked: Fingerprint, candidate: Fingerprint) -> float:
    """The share of `blocked`'s energy that `candidate` reproduces (0..1; see the module docstring)."""
    if blocked.empty:
        return 0.0
    return float(ContainmentIndex().extend([blocked.significant()]).scores([candidate])[0, 0])

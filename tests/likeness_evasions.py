"""The evasion suite: a blocked LoRA reworked as an attacker would, and unrelated LoRAs that must stay usable.

Shared by tests/test_likeness_evasion.py (which asserts on it) and bench/likeness.py (which prints its
figures). Each case is a request: one or more safetensors files with the strength each is used at.
Kinds: "disguise" (the full effect of the blocked LoRA, one file), "split" (the full effect only when the
files are combined), "partial" (a copy keeping most of the effect), "unrelated" (must not match).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from likeness_fixtures import (
    Lora,
    add_loras,
    add_noise,
    cast,
    change_alpha,
    conv_modules,
    keep_modules,
    kohya_key,
    lokr_native,
    mix_basis,
    random_lora,
    rank_slice,
    refactor,
    rescale,
    rescale_modules,
    sd1_modules,
    sdxl_modules,
    sgm_renamed,
    some_modules,
    to_diffusers,
    to_dora,
    to_full,
    to_kohya,
    to_locon,
    to_loha,
    to_lokr,
    to_peft,
    with_decoys,
)
from safetensors.torch import save

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    kind: str
    name: str
    files: tuple[tuple[bytes, float], ...]  # (safetensors bytes, strength)
    kept: float | None = None  # partial copies: the share of the blocked ΔW energy they reproduce
    target: int | None = 0  # which of the suite's blocked files it must match (None: must match none)


def _file(sd: StateDict) -> bytes:
    return save({k: v.contiguous() for k, v in sd.items()})


def energy_kept(blocked: Lora, copy: Lora) -> float:
    """Σ_m <ΔB_m, ΔC_m> / Σ_m ‖ΔB_m‖²: how much of the blocked update the copy reproduces."""

    def dot(a: Lora, b: Lora, p: str) -> float:
        (ua, da, aa), (ub, db, ab) = a.modules[p], b.modules[p]
        sa = 1.0 if aa is None else aa / da.shape[0]
        sb = 1.0 if ab is None else ab / db.shape[0]
        return sa * sb * float(((ua.double().T @ ub.double()) * (da.double() @ db.double().T)).sum())

    return sum(dot(blocked, copy, p) for p in blocked.modules if p in copy.modules) / sum(
        dot(blocked, blocked, p) for p in blocked.modules)


@dataclass(frozen=True)
class Suite:
    family: str
    blocked: tuple[bytes, ...]  # the blocklisted files (the first is the one most cases rework)
    cases: tuple[Case, ...]


def _attention_only(spec: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    return [m for m in spec if ".attn" in m[0]]


def build_suite(family: str = "sd1") -> Suite:
    """The blocked LoRA of `family` ("sd1", or "sdxl" with SGM names), its evasions and unrelated LoRAs."""
    sd1 = family == "sd1"
    spec = sd1_modules() if sd1 else sdxl_modules()
    other_spec = sdxl_modules() if sd1 else sd1_modules()
    base = random_lora(spec, seed=0, rank=8)

    def k(lora: Lora) -> StateDict:
        return to_kohya(lora, sd1=sd1)

    cases: list[Case] = []

    def add(kind: str, name: str, *files: tuple[StateDict, float], kept: float | None = None, target: int = 0) -> None:
        cases.append(Case(kind, name, tuple((_file(sd), s) for sd, s in files), kept,
                          None if kind == "unrelated" else target))

    kohya = k(base)
    unused = conv_modules()  # real layers (resnet convolutions) the LoRA does not adapt
    disguises: dict[str, StateDict] = {
        "renamed keys (lora_down/up -> lora_A/B)": {
            key.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for key, v in kohya.items()},
        "kohya -> diffusers": to_diffusers(base),
        "kohya -> PEFT with adapter name": {**to_peft(base, adapter="default"),
                                            **to_diffusers(keep_modules(base, lambda p: not p.startswith("unet.")))},
        "alpha ×4 with up ÷4": k(change_alpha(base, 4.0)),
        "uniform rescale ×0.2": k(rescale(base, 0.2)),
        "per-module rescale ×0.3..3": k(rescale_modules(base)),
        "negated (used at strength -1)": k(rescale(base, -1.0)),
        "re-factorised up·Q, Q⁻¹·down": k(mix_basis(base)),
        "SVD re-factorised at rank 32 (padded)": k(refactor(base, 32)),
        "fp16 cast": k(cast(base, torch.float16)),
        "bf16 cast + diffusers": to_diffusers(cast(base, torch.bfloat16)),
        "2% noise": k(add_noise(base, 0.02)),
        "decoy modules ~1e-6 on unused layers": with_decoys(kohya, unused, sd1=sd1),
        "decoys ~1e-6 + per-module rescale + fp16": with_decoys(k(cast(rescale_modules(base, 9), torch.float16)),
                                                               unused, sd1=sd1),
        "LoHa re-encoding": to_loha(base, sd1=sd1),
        "LoKr re-encoding": to_lokr(base, sd1=sd1),
        "LyCORIS full (diff) re-encoding": to_full(base, sd1=sd1),
        "DoRA re-encoding (pair + dora_scale)": to_dora(base, sd1=sd1),
    }
    if not sd1:
        disguises["SGM U-Net names"] = sgm_renamed(kohya)
    for name, sd in disguises.items():
        add("disguise", name, (sd, -1.0 if name.startswith("negated") else 1.0))

    # splits: every file alone is far from the blocked LoRA, the request as a whole is it
    paths = list(base.modules)
    half = set(paths[::2])
    add("split", "by modules (alternate modules)", (k(keep_modules(base, lambda p: p in half)), 1.0),
        (k(keep_modules(base, lambda p: p not in half)), 1.0))
    add("split", "by modules, second half negated at -1", (k(keep_modules(base, lambda p: p in half)), 1.0),
        (k(rescale(keep_modules(base, lambda p: p not in half), -1.0)), -1.0))
    add("split", "by rank (components 0-1 / 2-7)", (k(rank_slice(base, 0, 2)), 1.0), (k(rank_slice(base, 2)), 1.0))
    big = rescale(random_lora(spec, seed=77, rank=8), 3.0)
    add("split", "(blocked + U) at +1, U at -1", (k(add_loras(base, big)), 1.0), (k(big), -1.0))
    add("split", "(blocked + U) at +1, -U at +1, U in diffusers layout", (k(add_loras(base, big)), 1.0),
        (to_diffusers(rescale(big, -1.0)), 1.0))
    add("split", "three files: thirds of the modules, strengths 2 / 1 / -1",
        (k(rescale(keep_modules(base, lambda p: paths.index(p) % 3 == 0), 0.5)), 2.0),
        (k(keep_modules(base, lambda p: paths.index(p) % 3 == 1)), 1.0),
        (k(rescale(keep_modules(base, lambda p: paths.index(p) % 3 == 2), -1.0)), -1.0))
    add("split", "(blocked + U) as LoHa at +1, U at -1", (to_full(add_loras(base, big), sd1=sd1), 1.0), (k(big), -1.0))

    # partial copies keeping most of the effect
    three_q = some_modules(base, 0.75)
    add("partial", "three quarters of the modules", (k(three_q), 1.0), kept=energy_kept(base, three_q))
    for r in (4, 2):
        t = refactor(base, r)
        add("partial", f"rank truncation 8 -> {r}", (k(t), 1.0), kept=energy_kept(base, t))
    for rel in (0.3, 0.4, 0.5):
        add("partial", f"{rel:.0%} noise", (k(add_noise(base, rel, seed=int(rel * 10))), 1.0), kept=None)
    attn = random_lora(_attention_only(spec), seed=1, rank=8)  # the second blocked file
    self_attn = keep_modules(attn, lambda p: ".attn1." in p)
    add("partial", "self-attention only (of an attention-only LoRA)", (k(self_attn), 1.0),
        kept=energy_kept(attn, self_attn), target=1)

    # unrelated LoRAs: independent, other ranks/targets/alphas/layouts, and "trained alike" (a shared
    # component every LoRA trained on this base picks up, same structure and spectrum)
    common = random_lora(spec, seed=500, rank=8)
    unrelated: dict[str, StateDict] = {}
    for s in range(10, 18):
        unrelated[f"same modules and rank, seed {s}"] = k(random_lora(spec, seed=s))
    for s, r in ((30, 4), (31, 16), (32, 32), (33, 1)):
        unrelated[f"rank {r}, seed {s}"] = k(random_lora(spec, seed=s, rank=r, alpha=float(r)))
    for s in range(40, 46):
        unrelated[f"trained alike (30 % shared component), seed {s}"] = k(
            add_loras(rescale(common, 0.55), random_lora(spec, seed=s)))
    unrelated["attention only"] = k(random_lora(_attention_only(spec), seed=50))
    unrelated["feed-forward only"] = k(random_lora([m for m in spec if ".ff." in m[0]], seed=51))
    unrelated["text encoder only"] = k(random_lora([m for m in spec if m[0].startswith("text_encoder")], seed=52))
    unrelated["flat spectrum (decay 1.0)"] = k(random_lora(spec, seed=53, decay=1.0))
    unrelated["diffusers layout"] = to_diffusers(random_lora(spec, seed=54))
    unrelated["LoHa"] = to_loha(random_lora(spec, seed=55), sd1=sd1)
    unrelated["other family"] = to_kohya(random_lora(other_spec, seed=0), sd1=not sd1)
    lokr_sd, _ = lokr_native(spec, seed=56, sd1=sd1)
    unrelated["LoKr trained as such"] = lokr_sd
    for name, sd in unrelated.items():
        add("unrelated", name, (sd, 1.0))
    # and the blocked LoRA's own trained-alike sibling must not block its siblings: checked as pairs too
    add("unrelated", "two unrelated LoRAs together", (k(random_lora(spec, seed=60)), 1.0),
        (k(random_lora(spec, seed=61)), 0.8))
    add("unrelated", "an unrelated LoRA at +1 and -1 (cancels)", (k(random_lora(spec, seed=62)), 1.0),
        (k(random_lora(spec, seed=62)), -1.0))
    others = tuple(_file(k(random_lora(spec, seed=s, rank=r))) for s, r in ((2, 16), (3, 4)))
    return Suite(family, (_file(kohya), _file(k(attn)), *others), tuple(cases))


def locon_suite() -> Suite:
    """A LoCon (attention + 3×3 resnet convolutions) and its re-encodings as LoHa, LoKr, full, Tucker."""
    convs = conv_modules()
    spec = sd1_modules()[:20] + convs
    base = random_lora(spec, seed=3, rank=4)
    conv_paths = {p for p, _, _ in convs}
    cases = [Case("disguise", name, ((_file(sd), 1.0),)) for name, sd in {
        "LoCon -> LoHa (conv factors flattened)": to_loha(base),
        "LoCon -> LoKr": to_lokr(base),
        "LoCon -> LyCORIS full (4-D diff)": _full_4d(base, conv_paths),
        "LoCon -> Tucker LoCon (lora_mid)": _tucker(base, conv_paths),
        "LoCon -> fp16, alpha ×2": to_locon(cast(change_alpha(base, 2.0), torch.float16), conv_paths),
    }.items()]
    cases.append(Case("unrelated", "another LoCon", ((_file(to_locon(random_lora(spec, seed=4, rank=4), conv_paths)),
                                                      1.0),), target=None))
    return Suite("sd1-locon", (_file(to_locon(base, conv_paths)),), tuple(cases))


def _full_4d(lora: Lora, conv_paths: set[str]) -> StateDict:
    sd = to_full(lora)
    for p in conv_paths:
        key = f"{kohya_key(p)}.diff"
        sd[key] = sd[key].reshape(sd[key].shape[0], -1, 3, 3)
    return sd


def _tucker(lora: Lora, conv_paths: set[str]) -> StateDict:
    """Conv modules as LoCon with a Tucker core: up = I, down = I (1×1), mid = ΔW (exact)."""
    sd = to_locon(lora, conv_paths)
    for p in conv_paths:
        key = kohya_key(p)
        d = lora.delta(p).float()
        out, inp = d.shape[0], d.shape[1] // 9
        sd[f"{key}.lora_up.weight"] = torch.eye(out)[:, :, None, None].contiguous()
        sd[f"{key}.lora_down.weight"] = torch.eye(inp)[:, :, None, None].contiguous()
        sd[f"{key}.lora_mid.weight"] = d.reshape(out, inp, 3, 3).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(inp))
    return sd


Runner = Callable[[tuple[tuple[bytes, float], ...]], object]


def run(suite: Suite, check: Runner) -> dict[str, dict]:
    """{kind: {"caught": n, "total": n, "missed": [names], "caught_names": [names]}} with `check(files)`
    returning a match or None."""
    out: dict[str, dict] = {}
    for case in suite.cases:
        row = out.setdefault(case.kind, {"caught": 0, "total": 0, "missed": [], "caught_names": []})
        hit = check(case.files)
        row["total"] += 1
        if hit is not None:
            row["caught"] += 1
            row["caught_names"].append(case.name)
        else:
            row["missed"].append(case.name)
    return out

"""Safety figures.

Prompt audit quality: recall (share of must-block prompts blocked) and false-positive ratio (share
of must-allow prompts not allowed) on the labelled corpus (tests/data/prompt_audit_corpus.jsonl,
target ≥ 0.97 and ≤ 0.01) and on the held-out set written after the rules
(tests/data/prompt_heldout.jsonl, reported, not tuned for).

Prompt audit speed: 300-character prompts audited per second on one core (target ≥ 10,000/s), with
and without a negative prompt, and the worst audit time of several hostile 20,000-character prompts
(target ≤ 5 ms: matching is linear, nothing backtracks).

The likeness blocklist's figures (evasion suite, per-request check time) are bench/likeness.py's.

    .venv/bin/python bench/safety.py
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Run as a script, this file's folder comes first on the import path and its name would shadow the
# `safety` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402

from safety.prompt_audit import PromptAuditor  # noqa: E402

RULES_DIR = _HERE.parent / "configs" / "safety"
CORPORA = {"prompt_corpus": _HERE.parent / "tests" / "data" / "prompt_audit_corpus.jsonl",
           "prompt_heldout": _HERE.parent / "tests" / "data" / "prompt_heldout.jsonl"}


def _median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1000)
    return statistics.median(times)


_PROMPT_WORDS = (
    "masterpiece best quality portrait of a woman standing in a sunlit garden detailed face soft lighting bokeh "
    "35mm photo film grain golden hour highly detailed skin texture intricate embroidered dress flowers trees "
    "cinematic composition sharp focus dramatic clouds mountains lake reflection oil painting watercolor anime "
    "1girl smile looking at viewer long hair blue eyes city street night neon rain umbrella knight armor dragon "
    "castle forest mist fantasy concept art octane render unreal engine studio ghibli style ukiyo-e café naïve"
).split()


def _prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """Distinct prompts of exactly `length` characters in A1111 style (weights, LoRA tags, BREAK),
    with made-up words so the audit's per-word cache also sees misses."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        parts: list[str] = []
        while len(", ".join(parts)) < length:
            r = rng.random()
            word = _PROMPT_WORDS[rng.integers(len(_PROMPT_WORDS))]
            if r < 0.1:
                parts.append(f"({word}:{rng.uniform(0.5, 1.5):.1f})")
            elif r < 0.13:
                parts.append(f"<lora:style_{rng.integers(100)}:0.{rng.integers(1, 9)}>")
            elif r < 0.15:
                parts.append("BREAK")
            elif r < 0.3:
                parts.append(f"w{i}x{rng.integers(10**6)}")
            else:
                parts.append(word)
        out.append(", ".join(parts)[:length])
    return out


def _hostile_prompts(length: int = 20_000) -> dict[str, str]:
    return {
        "spaced_letters": "t e e n n u d e a " * length,
        "zero_width": "n\u200bu\u200bd\u200be 1\u200b5\u200by\u200bo " * length,
        "one_word": "a" * length,
        "brackets": "(" * (length // 2) + ")" * length,
        "name_prefixes": "taylor " * length,
        "digits": "1 2 3 4 5 6 7 8 9 " * length,
        "mixed_obfuscation": "ｎｕｄｅ tееn 15yo (little:1.3) girl, " * length,
        "adjectives": "young " * length,
        "weights": "(a:1.3)" * length,
        "split_pieces": "nu de ch ild lo li " * length,
        "cjk_no_spaces": "十四歳の少女裸 " * length,
        "ages_and_years": "girl 13 years of age born in 2012 " * length,
        "name_parts": "swift taylor alison " * length,
    }


def corpus_figures() -> dict[str, float]:
    """Recall and false-positive ratio of the audit on the labelled corpora."""
    auditor = PromptAuditor.from_dir(RULES_DIR)
    figures: dict[str, float] = {}
    for name, path in CORPORA.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        blocked = {"block": 0, "allow": 0}
        totals = {"block": 0, "allow": 0}
        for row in rows:
            got = auditor.audit(row["prompt"], row.get("negative", "")).action.value
            totals[row["expect"]] += 1
            blocked[row["expect"]] += got == "block" if row["expect"] == "block" else got != "allow"
        recall = blocked["block"] / totals["block"]
        false_positive = blocked["allow"] / totals["allow"]
        languages = len({r["lang"] for r in rows})
        print(f"{path.name}: {len(rows)} prompts in {languages} languages; recall {recall:.1%} "
              f"({blocked['block']}/{totals['block']} must-block blocked), false positives {false_positive:.1%} "
              f"({blocked['allow']}/{totals['allow']} must-allow not allowed)")
        figures[f"{name}_recall_ratio"] = round(recall, 4)
        figures[f"{name}_false_positive_ratio"] = round(false_positive, 4)
    return figures


def _per_second(fn: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Calls per second of CPU time (this process, one core: robust to other load on the machine)
    and per second of wall-clock time."""
    count, c0, t0 = 0, time.process_time(), time.perf_counter()
    while (cpu := time.process_time() - c0) < seconds:
        for _ in range(200):
            fn()
        count += 200
    return count / cpu, count / (time.perf_counter() - t0)


@contextlib.contextmanager
def _one_core() -> Iterator[None]:
    """Pin this process to one core (as the prompt-audit figure says), then give the others back."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def prompt_audit_figures(seconds: float = 3.0) -> dict[str, float]:
    with _one_core():
        return _prompt_audit_figures(seconds)


def _prompt_audit_figures(seconds: float) -> dict[str, float]:
    auditor = PromptAuditor.from_dir(RULES_DIR)
    prompts = _prompts(2000, 300)
    negatives = _prompts(2000, 120, seed=1)
    assert all(len(p) == 300 for p in prompts)
    cycle = itertools.cycle(prompts)
    pairs = itertools.cycle(zip(prompts, negatives, strict=True))
    for p in prompts:  # warm, as a running service would be
        auditor.audit(p)
    per_s, wall_per_s = _per_second(lambda: auditor.audit(next(cycle)), seconds)
    per_s_neg, _ = _per_second(lambda: auditor.audit(*next(pairs)), seconds)
    print(f"prompt audit: {per_s:,.0f} prompts/s of 300 characters per CPU-second on one core "
          f"(target ≥ 10,000/s; {wall_per_s:,.0f}/s wall-clock on this machine now); "
          f"{per_s_neg:,.0f}/s with a 120-character negative prompt")

    hostile = {}
    for name, text in _hostile_prompts().items():
        text = text[:20_000]
        assert len(text) == 20_000
        # CPU time of this process, like the throughput figure: robust to other load on the machine
        hostile[name] = _median_ms(lambda t=text: auditor.audit(t), 5, time.process_time)
    worst = max(hostile, key=hostile.get)
    print("hostile 20,000-character prompts (median of 5, CPU time on one core): "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in hostile.items()) + f"; worst {worst} (target ≤ 5 ms)")
    return {
        "prompts_audited_per_s": round(per_s),
        "prompts_audited_wall_per_s": round(wall_per_s),
        "prompts_with_negative_audited_per_s": round(per_s_neg),
        "hostile_20k_audit_ms": round(hostile[worst], 2),
    }


FIGURES: list[Callable[[], dict[str, float]]] = [corpus_figures, prompt_audit_figures]  # likeness: bench/likeness.py


def main() -> None:
    figures: dict[str, float] = {}
    for fn in FIGURES:
        figures.update(fn())
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()

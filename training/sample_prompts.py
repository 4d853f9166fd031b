"""Users' own sample prompts, in kohya's sample-prompt format.

One prompt per line, options after ` --`: `--n` negative prompt, `--w`/`--h` size, `--d` seed,
`--l` guidance (CFG) scale, `--s` steps. Lines starting with `#` and blank lines are skipped, as
kohya does. Values are checked against the service's limits: an option we do not know, a size out
of range or too many steps is refused (code `invalid_sample_prompt`), never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from genserve.core.errors import InvalidRequest

MAX_PROMPT_CHARS = 1000
_OPTION = re.compile(r"^(n|w|h|d|l|s)\s+(.*)$", re.DOTALL)


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None  # None: the training resolution
    height: int | None = None
    seed: int | None = None  # None: the run's seed + epoch
    guidance_scale: float | None = None  # None: the configured default
    steps: int | None = None


def _refuse(message: str, line: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_sample_prompt", details={"field": "sample_prompts", "line": line[:200]})


def parse_line(line: str) -> SamplePrompt | None:
    """One kohya sample-prompt line; None for a comment or a blank line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if len(text) > MAX_PROMPT_CHARS:
        raise _refuse(f"a sample prompt is longer than {MAX_PROMPT_CHARS} characters", text)
    head, *options = re.split(r"\s--", " " + text)
    values: dict = {"prompt": head.strip()}
    for option in options:
        match = _OPTION.match(option.strip())
        if not match:
            raise _refuse(f"unsupported sample prompt option --{option.strip().split(' ')[0]} "
                          "(supported: --n --w --h --d --l --s)", text)
        key, value = match.group(1), match.group(2).strip()
        try:
            if key == "n":
                values["negative"] = value
            elif key in ("w", "h", "d", "s"):
                values[{"w": "width", "h": "height", "d": "seed", "s": "steps"}[key]] = int(value)
            else:
                values["guidance_scale"] = float(value)
        except ValueError:
            raise _refuse(f"sample prompt option --{key} wants a number, got {value!r}", text) from None
    if not values["prompt"]:
        raise _refuse("a sample prompt line has no prompt", text)
    return SamplePrompt(**values)


def parse_sample_prompts(lines: list[str] | tuple[str, ...], limits, resolution: int) -> list[SamplePrompt]:  # noqa: ANN001
    """Every prompt of `lines` (entries may hold several lines), checked against `limits` (TrainingLimits;
    None: parse only, for parameters already checked at submit)."""
    from training.params import MAX_SAMPLE_PROMPTS

    out: list[SamplePrompt] = []
    for entry in lines:
        for line in str(entry).splitlines():
            prompt = parse_line(line)
            if prompt is None:
                continue
            out.append(prompt)
            if limits is None:
                continue
            lim, settings = limits.limits, limits.samples
            for side in (prompt.width, prompt.height):
                if side is not None and not (lim.min_resolution <= side <= max(resolution * 2, lim.min_resolution)
                                             and side % 8 == 0):
                    raise _refuse(f"sample size {side} must be a multiple of 8 in "
                                  f"{lim.min_resolution}..{max(resolution * 2, lim.min_resolution)}", line)
            if prompt.steps is not None and not 1 <= prompt.steps <= settings.max_steps:
                raise _refuse(f"sample steps must be 1..{settings.max_steps}", line)
            if prompt.guidance_scale is not None and not 0 <= prompt.guidance_scale <= 30:
                raise _refuse("sample guidance scale (--l) must be 0..30", line)
            if prompt.seed is not None and not 0 <= prompt.seed < 2**31:
                raise _refuse("sample seed (--d) must be 0..2^31-1", line)
    if len(out) > MAX_SAMPLE_PROMPTS:
        raise _refuse(f"at most {MAX_SAMPLE_PROMPTS} sample prompts", "")
    return out

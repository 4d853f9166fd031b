"""AUTOMATIC1111's prompt grammar, as the site's users write it.

    (word)  (word:1.3)  [word]  \\( \\)  BREAK  [from:to:when]  [to:when]  [from::when]  [a|b]  <lora:name:0.8>

Why a small parser here and not compel: compel (PyPI 2.5.1) has its own syntax (`word++`, `(word)1.3`,
`.blend()`), weights embeddings its own way (down-weighting by masking) and has no `BREAK`, no prompt
editing in A1111's form and no comma back-tracking at chunk ends, so an A1111 prompt would condition
differently from what its author saw. The rules below are A1111's (`modules/prompt_parser.py`,
`modules/sd_hijack_clip.py`, `modules/extra_networks.py`), ported line by line where they matter:

* `parse_prompt_attention`: (x) multiplies by 1.1, [x] by 1/1.1, (x:w) by w, nested groups multiply,
  an unclosed group runs to the end, `\\(` is a literal bracket, `BREAK` (upper case, a word of its own)
  ends the 75-token chunk.
* `prompt_schedule`: prompt editing `[from:to:when]` (when < 1 is a fraction of the steps) and
  alternation `[a|b]` (changes every step) give the text to condition on at each sampling step.
* `extract_extra_networks`: `<lora:name:w>` tags are cut out of the text; they name resources, they are
  not words. `<lora:name:te:unet>` gives separate text-encoder and UNet strengths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from genserve.core.errors import InvalidRequest

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_MARK = ("BREAK", -1.0)

# modules/prompt_parser.py
_ATTENTION_RE = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""",
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
# modules/extra_networks.py
_EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
LORA_NETWORKS = ("lora", "lyco")


class PromptSyntaxError(InvalidRequest):
    code = "prompt_syntax_invalid"


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:w>` tag. `te_strength` differs from `strength` only when the tag gives both."""

    name: str
    strength: float = 1.0
    te_strength: float = 1.0
    text: str = ""

    @property
    def split(self) -> bool:
        return self.te_strength != self.strength


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt with its extra-network tags taken out."""

    text: str
    loras: tuple[LoraTag, ...] = field(default_factory=tuple)


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"{tag}: {value!r} is not a number", code="lora_tag_invalid",
                                details={"tag": tag}) from None


def extract_extra_networks(text: str) -> ParsedPrompt:
    """Cut `<kind:args>` tags out of `text`. LoRA tags (`lora`, `lyco`) are returned; any other kind of
    extra network (hypernetworks ...) is refused: the service has none, and silently dropping it would
    give the user an image other than the one asked for.

    A1111's arguments: `<lora:name>` (1.0), `<lora:name:w>`, `<lora:name:te_w:unet_w>`, and the named
    forms `te=`, `unet=`."""
    tags: list[LoraTag] = []

    def cut(m: re.Match[str]) -> str:
        kind, args = m.group(1).lower(), m.group(2)
        if kind not in LORA_NETWORKS:
            raise PromptSyntaxError(f"{m.group(0)}: {kind} extra networks are not supported",
                                    code="extra_network_unsupported", details={"tag": m.group(0)})
        positional, named = [], {}
        for part in args.split(":"):
            key, eq, value = part.partition("=")
            if eq:
                named[key.strip()] = value.strip()
            else:
                positional.append(part.strip())
        if not positional or not positional[0]:
            raise PromptSyntaxError(f"{m.group(0)} names no LoRA", code="lora_tag_invalid", details={"tag": m.group(0)})
        te = _number(named.get("te", positional[1] if len(positional) > 1 else "1"), m.group(0))
        unet = _number(named.get("unet", positional[2] if len(positional) > 2 else str(te)), m.group(0))
        tags.append(LoraTag(name=positional[0], strength=unet, te_strength=te, text=m.group(0)))
        return ""

    stripped = _EXTRA_NETWORK_RE.sub(cut, text)
    return ParsedPrompt(text=stripped, loras=tuple(tags))


def lora_tag(name: str, strength: float) -> str:
    return f"<lora:{name}:{strength:g}>"


# ----------------------------------------------------------------------------------------- emphasis


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: the text split into runs of one weight each; `BREAK_MARK`
    (`("BREAK", -1)`) where a BREAK ends the chunk.

    >>> parse_prompt_attention('a (b:1.5) [c] \\\\(d\\\\)')
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091), (' (d)', 1.0)]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            if res[p] != list(BREAK_MARK):  # a BREAK inside brackets stays a BREAK (A1111 turns it into a word)
                res[p][1] *= multiplier

    for m in _ATTENTION_RE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_RE.split(piece)):
                if i > 0:
                    res.append(list(BREAK_MARK))
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge runs of equal weight
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1] and res[i][1] != BREAK_MARK[1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(str(t), float(w)) for t, w in res]


# ------------------------------------------------------------------------------ editing / alternation


@dataclass
class _Group:
    opener: str
    parts: list[list]  # each part: a list of str | _Group
    seps: list[str]
    closed: bool = False


def _parse_nodes(text: str) -> list:
    """The text as plain strings and bracket groups; inside a group, top-level ':' and '|' split parts.
    An escaped character stays escaped (two characters) for the emphasis parser after it."""
    root: list = []
    stack: list[_Group] = []

    def current() -> list:
        return stack[-1].parts[-1] if stack else root

    def add_text(s: str) -> None:
        cur = current()
        if cur and isinstance(cur[-1], str):
            cur[-1] += s
        else:
            cur.append(s)

    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            add_text(text[i:i + 2])
            i += 2
            continue
        if c in "([":
            group = _Group(opener=c, parts=[[]], seps=[])
            current().append(group)
            stack.append(group)
        elif stack and c == {"(": ")", "[": "]"}[stack[-1].opener]:
            stack.pop().closed = True
        elif stack and c in ":|":
            stack[-1].seps.append(c)
            stack[-1].parts.append([])
        else:
            add_text(c)
        i += 1
    return root


_NUMBER_RE = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*")


def _render_raw(nodes: list, step: int, steps: int) -> str:
    return "".join(n if isinstance(n, str) else _render_group(n, step, steps) for n in nodes)


def _edit_kind(group: _Group) -> str | None:
    if group.opener != "[" or not group.closed or not group.seps:
        return None
    if set(group.seps) == {"|"}:
        return "alternate"
    last = group.parts[-1]
    if set(group.seps) == {":"} and len(group.parts) in (2, 3) and len(last) == 1 and isinstance(last[0], str) \
            and _NUMBER_RE.fullmatch(last[0]):
        return "edit"
    return None


def _when(group: _Group, steps: int) -> int:
    value = float(group.parts[-1][0])
    if value < 1:
        value *= steps
    return min(steps, int(value))


def _render_group(group: _Group, step: int, steps: int) -> str:
    kind = _edit_kind(group)
    if kind == "alternate":
        return _render_raw(group.parts[(step - 1) % len(group.parts)], step, steps)
    if kind == "edit":
        before, after = ([[]] + group.parts)[-3:-1]
        return _render_raw(before if step <= _when(group, steps) else after, step, steps)
    out = group.opener
    for k, part in enumerate(group.parts):
        if k:
            out += group.seps[k - 1]
        out += _render_raw(part, step, steps)
    if group.closed:
        out += {"(": ")", "[": "]"}[group.opener]
    return out


def _has_edits(nodes: list) -> bool:
    return any(isinstance(n, _Group) and (_edit_kind(n) or any(_has_edits(p) for p in n.parts)) for n in nodes)


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt schedule: `[(last step, text), ...]` covering steps 1..`steps`, one entry per
    run of steps that conditions on the same text. A prompt without editing syntax is `[(steps, text)]`.

    >>> prompt_schedule("a [cat:dog:0.5]", 10)
    [(5, 'a cat'), (10, 'a dog')]
    """
    steps = max(1, int(steps))
    nodes = _parse_nodes(text)
    if not _has_edits(nodes):
        return [(steps, text)]
    out: list[tuple[int, str]] = []
    for step in range(1, steps + 1):
        rendered = _render_raw(nodes, step, steps)
        if out and out[-1][1] == rendered:
            out[-1] = (step, rendered)
        else:
            out.append((step, rendered))
    return out


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The scheduled text at 1-based `step` (the last entry past the end)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


# --------------------------------------------------------------------------------------- plain text


def plain_text(text: str) -> str:
    """The words of a prompt without weight, BREAK or editing syntax, for the prompt audit: both sides of
    an edit and every alternative are kept (any of them reaches the model), LoRA tags by their names."""
    parsed = extract_extra_networks(text) if "<" in text else ParsedPrompt(text)
    nodes = _parse_nodes(parsed.text)

    def words(ns: list) -> str:
        out = []
        for n in ns:
            if isinstance(n, str):
                out.append(n)
            elif _edit_kind(n) == "edit":
                out.append(" ".join(words(p) for p in n.parts[:-1]))
            else:
                parts = n.parts
                if n.opener == "(" and len(parts) > 1 and n.seps[-1] == ":" and len(parts[-1]) == 1 \
                        and isinstance(parts[-1][0], str) and _NUMBER_RE.fullmatch(parts[-1][0]):
                    parts = parts[:-1]  # (word:1.2): the weight is not a word
                out.append(" ".join(words(p) for p in parts))
        return "".join(out)

    body = "".join(" " if (t, w) == BREAK_MARK else t for t, w in parse_prompt_attention(words(nodes)))
    names = " ".join(tag.name for tag in parsed.loras)
    return re.sub(r"\s+", " ", f"{body} {names}").strip()

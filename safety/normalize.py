"""Normalise prompt text and split it into tokens that rule lists are matched against.

Obfuscation is undone before matching, never by regexes over the raw text: Unicode NFKC (full-width
forms), diacritics dropped, zero-width and other invisible characters removed, Cyrillic/Greek
look-alikes mapped to Latin, and case folded. Every normalised character remembers the index of the
original character it came from, so a match reports a span of the ORIGINAL text.

Tokens are runs of letters/digits; everything else (spaces, punctuation, A1111 syntax such as
`(word:1.3)`, `[a|b]`, `<lora:name:0.8>`) separates them. Each token also carries a canonical form
in which leetspeak classes are folded (0→o, 1/l→i, 3→e, 4→a, 5/$→s, 7→t, @→a), and runs of
single-character tokens ("t.e.e.n", "t e e n") are reported separately so the auditor can scan their
concatenation. All work is linear in the text length: no backtracking regexes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from itertools import accumulate

# Characters that render as nothing (or as blank space) and are used to split words invisibly.
_INVISIBLE = frozenset(
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b"
    "\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c"
    "\u206d\u206e\u206f\u2800\u3164\ufeff\uffa0"
)

# Look-alikes that NFKC keeps distinct (after lower-casing).
_HOMOGLYPHS = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "ԁ": "d", "ԛ": "q",
    "ԝ": "w", "һ": "h", "ӏ": "l", "ү": "y", "ь": "b", "п": "n", "г": "r",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "σ": "o", "ς": "c", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "μ": "u",
    # Latin look-alikes outside ASCII
    "ı": "i", "ɡ": "g", "ɑ": "a", "ʟ": "l", "ɪ": "i", "ᴏ": "o", "ᴇ": "e", "ᴛ": "t", "ɴ": "n", "ꜱ": "s",
    "ℓ": "l", "ø": "o", "ð": "d", "ß": "ss", "æ": "ae", "œ": "oe", "þ": "th",
}

# Leetspeak and symbol classes folded for matching (1 and l both fold to i: "1oli" == "loli").
_LEET = str.maketrans({"0": "o", "1": "i", "l": "i", "3": "e", "4": "a", "5": "s", "7": "t"})

# Symbols that stand for letters ("t@ylor", "$ex"); folded during normalisation so they join words.
_WORD_SYMBOLS = str.maketrans({"@": "a", "$": "s"})

# Words: runs of letters/digits, a digit prefix glued to letters cut off as its own word ("15yo" ->
# 15, yo). The ASCII pattern gives the same words on ASCII text, only faster.
_WORD_RE = re.compile(r"(\d+(?=[^\W\d_])|[^\W_]+)")
_ASCII_WORD_RE = re.compile(r"([0-9]+(?=[a-z])|[a-z0-9]+)")
_DIGITS_RE = re.compile(r"\d+")
# Runs of single-character words a few separators apart ("t.e.e.n"); bounded repeats, no backtracking.
_RUN_RE = re.compile(r"(?<![^\W_])[^\W_](?:[\W_]{1,3}[^\W_](?![^\W_]))+")
_ASCII_RUN_RE = re.compile(r"(?<![a-z0-9])[a-z0-9](?:[^a-z0-9]{1,3}[a-z0-9](?![a-z0-9]))+")
# Attention weights and schedule steps: "(x:1.3)", "<lora:name:0.8>", "[a:b:0.5]".
_WEIGHT_RE = re.compile(r":[ \t]*[-+]?(\d+(?:\.\d+)?)[ \t]*(?=[)\]>:]|$)")
_REPEAT_RE = re.compile(r"(.)\1+")
_LONG_REPEAT_RE = re.compile(r"(.)\1\1+")



def _fold_char(ch: str) -> str:
    """One original character -> its normalised replacement ('' when it is invisible)."""
    if ch in _INVISIBLE:
        return ""
    cat = unicodedata.category(ch)
    if cat == "Cf":
        return ""
    if cat in ("Zs", "Zl", "Zp", "Cc"):
        return " "
    out = []
    for c in unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", ch).lower()):
        if unicodedata.combining(c) or c in _INVISIBLE or unicodedata.category(c) == "Cf":
            continue
        c = _HOMOGLYPHS.get(c, c)
        out.append(c)
    return "".join(out).translate(_WORD_SYMBOLS)


class _FoldTable(dict):
    """`str.translate` table: code point -> normalised text, filled on first sight of a character."""

    def __missing__(self, code: int) -> str:
        if len(self) > _FOLD_TABLE_LIMIT:  # hostile input with endless distinct characters
            self.clear()
        value = self[code] = _fold_char(chr(code))
        return value


_FOLD_TABLE_LIMIT = 200_000
_FOLD = _FoldTable()


class Normalized:
    """Normalised text, and the way back from its positions to the original text's."""

    __slots__ = ("source", "text", "_origin")

    def __init__(self, source: str, text: str, identity: bool):
        self.source = source
        self.text = text
        self._origin: tuple[int, ...] | None = () if not identity else None

    @property
    def origin(self) -> tuple[int, ...] | None:
        """Per normalised character, the index of its original character (None: the same index).
        Computed on first use: only texts with a match need it."""
        if self._origin == ():
            self._origin = tuple(i for i, ch in enumerate(self.source) for _ in _FOLD[ord(ch)])
        return self._origin

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original-text span `[a, b)` covering normalised characters `[start, end)`."""
        origin = self.origin
        if origin is None:
            return start, end
        return origin[start], origin[end - 1] + 1


def normalize(text: str) -> Normalized:
    if text.isascii():
        return Normalized(text, text.lower().translate(_WORD_SYMBOLS), identity=True)
    return Normalized(text, text.translate(_FOLD), identity=False)


def canonical(word: str) -> str:
    """Leetspeak-folded form of an already normalised word (both rules and prompts use it)."""
    return word.translate(_LEET)


def squeeze(word: str) -> str:
    """Collapse repeated letters ("nuuude" -> "nude"); used only as a fallback lookup."""
    return _REPEAT_RE.sub(r"\1", word)


def shorten_repeats(word: str) -> str:
    """Cut letters repeated 3+ times down to two ("teeeen" -> "teen"); a fallback lookup."""
    return _LONG_REPEAT_RE.sub(r"\1\1", word)


def has_long_repeat(word: str) -> bool:
    """True when a letter repeats 3+ times in a row, the sign of a stretched word ("nuuude")."""
    prev, count = "", 0
    for c in word:
        count = count + 1 if c == prev else 1
        if count >= 3:
            return True
        prev = c
    return False


@dataclass(slots=True)
class Tokens:
    """The words of a normalised text, as parallel lists (cheap to build: no object per word).

    `canon[i]` is word i leet-folded; `span(i)` is its `[start, end)` in normalised text. `numbers`
    maps the index of a whole-number word (not part of a decimal such as the weight in `(x:1.3)`)
    to its value; `joined` maps a digit word glued to the next word ("7een", "15yo") to the canonical
    form of both together. `weights` holds the digit words of A1111 attention weights, which
    matchers may look past ("(15:1.0) yo" is "15 yo"). `runs` lists runs (2+ long) of single-character words close together
    ("t.e.e.n"), as word indexes.
    """

    canon: list[str]
    offsets: list[int]  # offsets[2i+1], offsets[2i+2]: start and end of word i
    numbers: dict[int, int]
    joined: dict[int, str]
    runs: list[list[int]]
    weights: frozenset[int]  # digit words of attention weights / schedules: "(x:1.3)", "[a:b:0.5]"

    def span(self, i: int) -> tuple[int, int]:
        return self.offsets[2 * i + 1], self.offsets[2 * i + 2]


def tokenize(norm: Normalized) -> Tokens:
    text = norm.text
    ascii_text = text.isascii()
    parts = (_ASCII_WORD_RE if ascii_text else _WORD_RE).split(text)  # sep, word, sep, ..., word, sep
    words = parts[1::2]
    n = len(words)
    offsets = list(accumulate(map(len, parts), initial=0))
    canon = "\0".join(words).translate(_LEET).split("\0") if words else []
    index_at = dict(zip(offsets[1:-1:2], range(n), strict=True))  # word start -> word index
    numbers: dict[int, int] = {}
    joined: dict[int, str] = {}
    for m in _DIGITS_RE.finditer(text):
        a, b = m.span()
        i = index_at.get(a)
        if i is None:  # digits inside a word ("w0x")
            continue
        if i + 1 < n and offsets[2 * i + 3] == b:  # glued to the next word ("7een", "15yo")
            joined[i] = canon[i] + canon[i + 1]
        decimal = (text[b:b + 1] in (".", ",") and text[b + 1:b + 2].isdigit()) or (
            a >= 2 and text[a - 1] in (".", ",") and text[a - 2].isdigit())
        if b - a <= 4 and not decimal:
            numbers[i] = int(m.group())
    weights: set[int] = set()
    if ":" in text:
        for m in _WEIGHT_RE.finditer(text):
            a, b = m.span(1)
            i = index_at.get(a)
            while i is not None and i < n and offsets[2 * i + 1] < b:
                weights.add(i)
                i += 1
    runs = [list(range(index_at[m.start()], index_at[m.end() - 1] + 1)) for m in (_ASCII_RUN_RE if ascii_text else _RUN_RE).finditer(text)]
    return Tokens(canon, offsets, numbers, joined, runs, frozenset(weights))

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
from functools import lru_cache
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

# Words: runs of letters/digits (the ASCII pattern is the same on ASCII text, only faster).
_WORD_RE = re.compile(r"([^\W_]+)")
_ASCII_WORD_RE = re.compile(r"([a-z0-9]+)")
# A digit prefix glued to letters is its own word ("15yo" -> 15, yo); this finds candidates quickly.
_GLUED_DIGITS_RE = re.compile(r"\d[^\W\d_]")
_DIGITS_RE = re.compile(r"\d+")
_REPEAT_RE = re.compile(r"(.)\1+")
_LONG_REPEAT_RE = re.compile(r"(.)\1\1+")

# Single-character tokens at most this many separator characters apart form one run ("t . e . e . n").
MAX_RUN_GAP = 3


@lru_cache(maxsize=8192)
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


@dataclass(frozen=True)
class Normalized:
    """Normalised text plus, per normalised character, the index of its original character."""

    source: str
    text: str
    origin: tuple[int, ...] | None  # None: identity (ASCII input)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original-text span `[a, b)` covering normalised characters `[start, end)`."""
        if self.origin is None:
            return start, end
        return self.origin[start], self.origin[end - 1] + 1


def normalize(text: str) -> Normalized:
    if text.isascii():
        return Normalized(text, text.lower().translate(_WORD_SYMBOLS), None)
    folded = [_fold_char(ch) for ch in text]
    origin = tuple(i for i, f in enumerate(folded) for _ in f)
    return Normalized(text, "".join(folded), origin)


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
    parts = (_ASCII_WORD_RE if text.isascii() else _WORD_RE).split(text)  # sep, word, sep, ..., word, sep
    if _GLUED_DIGITS_RE.search(text):
        parts = _split_digit_prefixes(parts)
    words = parts[1::2]
    seps = parts[2:-1:2]  # seps[i] lies between word i and word i+1
    offsets = list(accumulate(map(len, parts), initial=0))
    canon = "\0".join(words).translate(_LEET).split("\0") if words else []
    numbers: dict[int, int] = {}
    joined: dict[int, str] = {}
    for i in [i for i, w in enumerate(words) if w[0].isdigit()]:
        a, b = offsets[2 * i + 1], offsets[2 * i + 2]
        value = _integer(text, a, b)
        if value is not None:
            numbers[i] = value
        if i < len(seps) and not seps[i]:
            joined[i] = canon[i] + canon[i + 1]
    weights = _weight_words(parts, numbers) if ":" in text else frozenset()
    runs: list[list[int]] = []
    run: list[int] = []
    for i in [i for i, w in enumerate(words) if len(w) == 1]:
        if run and run[-1] == i - 1 and len(seps[i - 1]) <= MAX_RUN_GAP:
            run.append(i)
        else:
            if len(run) > 1:
                runs.append(run)
            run = [i]
    if len(run) > 1:
        runs.append(run)
    return Tokens(canon, offsets, numbers, joined, runs, weights)


def _weight_words(parts: list[str], numbers: dict[int, int]) -> frozenset[int]:
    """Digit words right after `:` and closed by `)`, `]`, `>`, `:` or the end: `:1.3)`, `:0.8>`."""
    words = parts[1::2]
    found: set[int] = set()
    for i, w in enumerate(words):
        if not w.isdigit() or not parts[2 * i].rstrip(" +-").endswith(":"):
            continue
        last = i
        if parts[2 * i + 2] == "." and i + 1 < len(words) and words[i + 1].isdigit():
            last = i + 1  # the decimals of 1.3
        after = parts[2 * last + 2].lstrip()
        if not after or after[0] in ")]>:":
            found.update(range(i, last + 1))
    return frozenset(found)


def _split_digit_prefixes(parts: list[str]) -> list[str]:
    out: list[str] = []
    for k, part in enumerate(parts):
        if k % 2 and part[0].isdigit() and not part.isdigit():
            digits = _DIGITS_RE.match(part).group()
            out += [digits, "", part[len(digits):]]
        else:
            out.append(part)
    return out


def _integer(text: str, start: int, end: int) -> int | None:
    """The value of a digit word that is a whole number (not part of a decimal like 1.3 or 0,5)."""
    if end - start > 4 or not text[start:end].isdigit():
        return None
    if end + 1 < len(text) and text[end] in ".," and text[end + 1].isdigit():
        return None
    if start >= 2 and text[start - 1] in ".," and text[start - 2].isdigit():
        return None
    return int(text[start:end])

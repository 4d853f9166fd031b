"""The words of normalised prompt text (`Tokens`, `tokenize`), what rule lists are matched against.

Words are runs of letters and digits, a digit prefix glued to letters cut off as its own word ("15yo"
-> 15, yo); everything else (spaces, punctuation, A1111 syntax such as `(word:1.3)`, `[a|b]`,
`<lora:name:0.8>`) separates them. Each word also has a canonical form in which leetspeak classes are
folded (see `safety.normalize.canonical`). A 20,000-character prompt has up to 10,000 words, so what
every prompt needs is found by regexes over the whole text and by maps over the words (C speed), and
what only some need (offsets, numbers, weights, native forms) is worked out on first use.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator
from itertools import accumulate, compress, count, repeat
from operator import add, mul, not_

from safety.normalize import _CJK_RE, _LEET, _LEET_PAIRS, Normalized

# Words: runs of letters/digits, a digit prefix glued to letters cut off as its own word ("15yo" ->
# 15, yo). The ASCII pattern gives the same words on ASCII text, only faster.
_WORD_RE = re.compile(r"([^\W\d_][^\W_]*|\d+)")
_ASCII_WORD_RE = re.compile(r"([a-z][a-z0-9]*|[0-9]+)")
# A digit glued to a letter after it: the text has `joined` words only if this matches.
_GLUED_RE = re.compile(r"\d[^\W\d_]")
_ASCII_GLUED_RE = re.compile(r"[0-9][a-z]")
# Runs of single-character words ("t.e.e.n", "t e  e n"), found in the text rather than word by word
# when no digit is glued to a letter (then words are exactly the runs of letters and digits): a
# character with no letter or digit on either side, the next one 1-3 separators on.
_RUN_RE = re.compile(r"[^\W_](?<![^\W_][^\W_])(?![^\W_])(?:[\W_]{1,3}[^\W_](?![^\W_]))+")
_ASCII_RUN_RE = re.compile(r"[a-z0-9](?<![a-z0-9][a-z0-9])(?![a-z0-9])(?:[^a-z0-9]{1,3}[a-z0-9](?![a-z0-9]))+")
# A decimal point or comma: a separator of exactly one of these characters between two digits.
_DECIMAL_SEPS = frozenset({".", ","})
_ASCII_SEPARATOR_BYTES = bytes(c for c in range(128) if not chr(c).isalnum() or chr(c).isupper())
_FEW_SINGLES = 256  # more one-character words than this, and the run regex is faster than maps over them
# Attention weights and schedule steps: "(x:1.3)", "<lora:name:0.8>", "[a:b:0.5]" (`Tokens.weights`
# reads this off the words; the regex is the definition the tests hold it to).
_WEIGHT_RE = re.compile(r":[ \t]*[-+]?(\d+(?:\.\d+)?)[ \t]*(?=[)\]>:]|$)")
_WEIGHT_LEAD_RE = re.compile(r"[ \t]*[-+]?")


class Tokens:
    """The words of a normalised text, as parallel lists (cheap to build: no object per word).

    `canon[i]` is word i leet-folded; `span(i)` is its `[start, end)` in normalised text. `native`
    maps the index of a word whose native-script form differs from its skeleton to that form
    ("лет", not a Latin skeleton of it). `numbers` maps the index of a whole-number word (not part
    of a decimal such as the weight in `(x:1.3)`) to its value; `joined` maps a digit word glued to
    the next word ("7een", "15yo") to the canonical form of both together. `weights` holds the digit
    words of A1111 attention weights, which matchers may look past ("(15:1.0) yo" is "15 yo").
    `runs` lists runs (2+ long) of single-character words close together ("t.e.e.n"), as word
    indexes. `cjk` lists words in scripts written without spaces, matched by substring.
    Whatever only some prompts need (offsets, numbers, weights, native forms) is worked out on first
    use, and what every prompt needs is found by regexes over the whole text (C speed), not by a
    Python loop over its words: a 20,000-character prompt has up to 10,000 of them.
    """

    __slots__ = ("canon", "joined", "runs", "cjk", "text", "_norm", "_parts", "_offsets", "_digits", "_numbers",
                 "_weights", "_native")

    def __init__(self, norm: Normalized, canon: list[str], parts: list[str]):
        self.text = text = norm.text
        self.canon = canon
        self._norm = norm
        self._parts = parts  # sep, word, sep, ..., word, sep
        self._offsets: list[int] | None = None
        self._digits: list[int] | None = None
        self._numbers: dict[int, int] | None = None
        self._weights: frozenset[int] | None = None
        self._native: dict[int, str] | None = None
        ascii_text = text.isascii()
        self.joined: dict[int, str] = {}
        if (_ASCII_GLUED_RE if ascii_text else _GLUED_RE).search(text):
            # a digit word glued to the next word ("7een", "15yo"): no separator between them
            digits = self.digits
            glued = list(compress(digits, map(not_, map(parts.__getitem__, map(add, map(mul, digits, repeat(2)),
                                                                                 repeat(2))))))
            if glued and glued[-1] == len(canon) - 1:  # the last word has nothing after it
                glued.pop()
            after = map(canon.__getitem__, map(add, glued, repeat(1)))
            self.joined = dict(zip(glued, map(add, map(canon.__getitem__, glued), after), strict=True))
        self.runs: list[list[int]] = []
        lengths = list(map(len, parts[1::2]))
        if lengths.count(1) > _FEW_SINGLES and not self.joined:
            # many one-character words: the regex finds long runs faster ("5yo" has a one-letter word
            # it cannot see alone, so only where no digit is glued to a word)
            if ascii_text:
                # words counted rather than looked up in the offsets: the words before a run, then one
                # per letter or digit in it (its words are one character each)
                seen_words, seen_to = 0, 0
                for m in _ASCII_RUN_RE.finditer(text):
                    seen_words += len(_ASCII_WORD_RE.findall(text, seen_to, m.start()))
                    size = len(m.group().encode("ascii").translate(None, _ASCII_SEPARATOR_BYTES))
                    self._add_run(seen_words, seen_words + size - 1)
                    seen_words, seen_to = seen_words + size, m.end()
            else:
                for m in _RUN_RE.finditer(text):
                    self._add_run(self._word_at(m.start()), self._word_at(m.end() - 1))
        else:
            self._runs_of_words(lengths)
        self.cjk: list[int] = []
        if not ascii_text and _CJK_RE.search(text):
            # CJK characters have no Latin skeleton: the skeleton word shows them as the native one does
            self.cjk = list(compress(count(), map(_CJK_RE.search, canon)))

    def _add_run(self, first: int, last: int) -> None:
        # "1.3" (a weight, a version) is two digits, not a spaced-out word; longer digit runs may be leet
        if last > first + 1 or not (self._parts[2 * first + 1] + self._parts[2 * last + 1]).isdecimal():
            self.runs.append(list(range(first, last + 1)))

    def _runs_of_words(self, lengths: list[int]) -> None:
        """Runs of one-character words with short separators, word by word (a plain loop over the
        one-character words is cheaper here than maps over them)."""
        parts, runs = self._parts, self.runs
        first = last = -2
        for i in compress(count(), map((1).__eq__, lengths)):
            if last == i - 1 and 0 < len(parts[2 * i]) <= 3:
                last = i
                continue
            # as `_add_run`, inline: a hostile prompt's weights ("1.3") bring thousands of digit pairs
            if last > first + 1 or (last > first and not (parts[2 * first + 1] + parts[2 * last + 1]).isdecimal()):
                runs.append(list(range(first, last + 1)))
            first = last = i
        if last > first:
            self._add_run(first, last)

    def _non_ascii(self) -> list[int]:
        return list(compress(count(), map(not_, map(str.isascii, self.canon))))

    def _word_at(self, k: int) -> int:
        """The index of the word holding normalised character k."""
        return (bisect_right(self.offsets, k) - 2) // 2

    @property
    def offsets(self) -> list[int]:
        """offsets[2i+1], offsets[2i+2]: start and end of word i in the normalised text."""
        if self._offsets is None:
            self._offsets = list(accumulate(map(len, self._parts), initial=0))
        return self._offsets

    @property
    def digits(self) -> list[int]:
        """Indexes of the words made of digits (digit words are whole words)."""
        if self._digits is None:
            self._digits = list(compress(count(), map(str.isdecimal, self._parts[1::2])))
        return self._digits

    @property
    def native(self) -> dict[int, str]:
        if self._native is None:
            native: dict[int, str] = {}
            source, offsets, words = self._norm.native, self.offsets, self._parts[1::2]
            if source is not None:
                for i in self._non_ascii():
                    own = source[offsets[2 * i + 1]:offsets[2 * i + 2]]
                    if own != words[i]:
                        native[i] = own
            self._native = native
        return self._native

    def span(self, i: int) -> tuple[int, int]:
        offsets = self._offsets if self._offsets is not None else self._offsets_upto(2 * i + 2)
        return offsets[2 * i + 1], offsets[2 * i + 2]

    def _offsets_upto(self, k: int) -> list[int]:
        """The offsets at least as far as index k. Reasons cite the first hits of each rule, so a
        verdict on a long prompt rarely needs them all."""
        if k > len(self._parts) // 2:
            return self.offsets
        return list(accumulate(map(len, self._parts[:k]), initial=0))

    def piece(self, first: int, last: int) -> tuple[str, ...]:
        """Words first..last with the separators between them: what a neighbourhood looks like."""
        return tuple(self._parts[2 * first + 1:2 * last + 2])

    def gap(self, i: int) -> str:
        """The separator text between word i and word i + 1."""
        return self._parts[2 * i + 2]

    @property
    def words(self) -> list[str]:
        """The words as written in the normalised text (before leetspeak folding)."""
        return self._parts[1::2]

    def is_number(self, k: int) -> bool:
        """Whether word k is a whole number (up to 4 digits, not either side of a decimal point or
        comma such as the weight in `(x:1.3)`): asked word by word, so a hostile prompt of thousands of
        numbers costs only the ones looked at."""
        parts = self._parts
        word = parts[2 * k + 1]
        if len(word) > 4 or not word.isdecimal():
            return False
        after, before = parts[2 * k + 2], parts[2 * k]
        return not ((after in _DECIMAL_SEPS and k + 1 < len(self.canon) and parts[2 * k + 3][:1].isdecimal())
                    or (before in _DECIMAL_SEPS and k > 0 and parts[2 * k - 1][-1:].isdecimal()))

    def iter_numbers(self) -> Iterator[tuple[int, int]]:
        """(word index, value) of the whole numbers, in text order, worked out as they are asked for."""
        words = self._parts[1::2]
        return ((k, int(words[k])) for k in self.digits if self.is_number(k))

    @property
    def numbers(self) -> dict[int, int]:
        if self._numbers is None:
            self._numbers = dict(self.iter_numbers())
        return self._numbers

    def _weight_at(self, k: int) -> int:
        """How many words (0, 1 or 2: "1.3") of an attention weight begin at word k (what `_WEIGHT_RE`
        matches: a colon, spaces or tabs and a sign, one number, spaces or tabs, then a closing bracket,
        another colon or the end of the text)."""
        parts = self._parts
        sep = parts[2 * k]
        if ":" not in sep or not parts[2 * k + 1].isdecimal() or not _WEIGHT_LEAD_RE.fullmatch(sep, sep.rfind(":") + 1):
            return 0
        if parts[2 * k + 2] == "." and k + 1 < len(self.canon) and parts[2 * k + 3].isdecimal() and self._weight_ends(k + 2):
            return 2
        return 1 if self._weight_ends(k + 1) else 0

    def _weight_ends(self, k: int) -> bool:
        """Whether separator k (after a weight's number) closes it: spaces or tabs, then `)`, `]`, `>`,
        `:` or the end of the text (where a regex's `$` also allows one last line break)."""
        rest = self._parts[2 * k].lstrip(" \t")
        if rest:
            return rest[0] in ")]>:" or (k == len(self.canon) and rest == "\n")
        return k == len(self.canon)

    def _weight_starts(self) -> Iterator[tuple[int, int]]:
        if ":" not in self.text:
            return iter(())
        seps = self._parts[::2]  # separator k comes before word k
        starts = compress(count(), map(str.__contains__, seps[:len(self.canon)], repeat(":")))
        return ((k, size) for k in starts if (size := self._weight_at(k)))

    @property
    def has_weights(self) -> bool:
        """Whether the text has an attention weight at all (stops at the first one)."""
        if self._weights is None:
            return next(self._weight_starts(), None) is not None
        return bool(self._weights)

    def is_weight(self, k: int) -> bool:
        """Whether word k is (part of) an attention weight's number."""
        if self._weights is not None or len(self.canon) <= _FEW_SINGLES:  # a short prompt: all at once
            return k in self.weights
        return bool(self._weight_at(k)) or (k > 0 and self._weight_at(k - 1) == 2)

    @property
    def weights(self) -> frozenset[int]:
        """Digit words of attention weights / schedules: "(x:1.3)", "[a:b:0.5]"."""
        if self._weights is None:
            self._weights = frozenset(k + d for k, size in self._weight_starts() for d in range(size))
        return self._weights


def tokenize(norm: Normalized) -> Tokens:
    text = norm.text
    parts = (_ASCII_WORD_RE if text.isascii() else _WORD_RE).split(text)  # sep, word, sep, ..., word, sep
    words = parts[1::2]
    canon = _leet("\0".join(words)).split("\0") if words else []
    return Tokens(norm, canon, parts)


def _leet(text: str) -> str:
    """`canonical` of many words at once. `str.translate` is fast only on ASCII text; elsewhere one
    `str.replace` per leet character is (a Python-level lookup per character is not)."""
    if text.isascii():
        return text.translate(_LEET)
    for char, letter in _LEET_PAIRS:
        if char in text:
            text = text.replace(char, letter)
    return text

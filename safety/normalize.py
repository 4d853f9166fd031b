"""Normalise prompt text and split it into tokens that rule lists are matched against.

Obfuscation is undone before matching, never by regexes over the raw text. Each original character
folds to two parallel forms of the same length:

- the *native* form: NFKC (full-width, mathematical alphanumerics, circled letters), lower case,
  diacritics dropped, invisible characters removed. Non-Latin words keep their script here, so the
  Russian, Japanese, Chinese and Korean lexicons match real words in those languages;
- the *skeleton* form: the native form with every look-alike of a Latin letter or digit replaced by
  it (Cyrillic "е", Greek "ν", Armenian "ո", Cherokee, Lisu, ...). Latin-script rules match here.

Where the look-alike data comes from: Unicode TR39's confusables table as shipped by the
`confusable_homoglyphs` package (its `confusables.json` is generated from Unicode's
`confusables.txt` and installed with the wheel, so nothing is downloaded at run time; the package is
pure Python with no further dependencies). `unicodedata2` ships only the character database, not
TR39, and the `confusables` package expands every string into all its variants, which is far too
slow for a per-character table. TR39 lists a few letters only in capital form (Cyrillic "К",
Greek "Κ"); their lower-case forms map through their capital. What TR39 does not treat as letters
at all is read from the character's Unicode name: small capitals ("LATIN LETTER SMALL CAPITAL N"),
negative squared/circled letters ("🅽"), regional indicators ("🇳") and parenthesised letters
("⒩"). The short table `_EXTRA` holds the few italic look-alikes TR39 leaves out (Cyrillic "п"
reads as "n" in most fonts); it is hand-written because no package lists them.

Invisible characters are removed *inside* words: zero-width characters, format characters (tag
characters, bidi controls), variation selectors and other non-spacing marks, emoji skin tones.
Emoji that stand for a person fold to a word ("👧" -> " child "), so rules see them as words.

Every normalised character remembers the index of the original character it came from, so a match
reports a span of the ORIGINAL text. Tokens are runs of letters/digits; everything else (spaces,
punctuation, A1111 syntax such as `(word:1.3)`, `[a|b]`, `<lora:name:0.8>`) separates them. Each
token also carries a canonical form in which leetspeak classes are folded (0→o, 1/l→i, 3→e, 4→a,
5/$→s, 7→t, @→a), and runs of single-character tokens ("t.e.e.n", "t e e n") are reported
separately so the auditor can scan their concatenation. All work is linear in the text length: no
backtracking regexes.
"""

from __future__ import annotations

import json
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from itertools import accumulate, compress, count, islice, repeat
from operator import add, mul, not_

# Characters that render as nothing (or as blank space) and are used to split words invisibly.
_INVISIBLE = frozenset(
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202b"
    "\u202c\u202d\u202e\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c"
    "\u206d\u206e\u206f\u2800\u3164\ufeff\uffa0"
)
_DROPPED_CATEGORIES = frozenset({"Cf", "Mn", "Me"})  # format chars, variation selectors, marks
_SKIN_TONES = range(0x1F3FB, 0x1F400)

# Emoji read as words. A child emoji is a minor noun in every language; 🔞 marks adult content.
_EMOJI_WORDS = {
    **dict.fromkeys("👶🧒👧👦🚸🍼", " child "),
    "🔞": " nsfw ",
    "👙": " bikini ",
}

# Italic look-alikes TR39 does not list (see the module docstring).
_EXTRA = {"п": "n", "ω": "w", "ς": "c", "ø": "o", "ð": "d", "ɩ": "i", "ʀ": "r"}

# Ligatures and letters NFKD keeps whole, spelled out in both forms. "ñ" is a letter of its own in
# Spanish, not an accented n: "niña" (girl) must not fold into the given name "Nina".
_EXPAND = {"ß": "ss", "æ": "ae", "œ": "oe", "þ": "th", "ĳ": "ij", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ñ": "ny"}

# Letters that NFKC does not decompose but whose Unicode name says which Latin letter they draw.
_NAMED_LETTER = re.compile(
    r"^(?:LATIN LETTER SMALL CAPITAL|NEGATIVE (?:SQUARED|CIRCLED) LATIN CAPITAL LETTER|"
    r"REGIONAL INDICATOR SYMBOL LETTER|PARENTHESIZED LATIN SMALL LETTER|SQUARED LATIN CAPITAL LETTER|"
    r"CIRCLED LATIN (?:CAPITAL|SMALL) LETTER|MODIFIER LETTER (?:CAPITAL|SMALL)) ([A-Z])$"
)
_NO_SKELETON = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "HALFWIDTH KATAKANA", "BOPOMOFO")

# Leetspeak and symbol classes folded for matching (1 and l both fold to i: "1oli" == "loli").
_LEET_PAIRS = (("0", "o"), ("1", "i"), ("l", "i"), ("3", "e"), ("4", "a"), ("5", "s"), ("7", "t"))
_LEET = str.maketrans(dict(_LEET_PAIRS))

# Symbols that stand for letters ("t@ylor", "$ex"); folded during normalisation so they join words.
_WORD_SYMBOLS = str.maketrans({"@": "a", "$": "s"})
# Symbols that stand for a letter only between two letters ("ch!ld", "nud€"; "wow!" keeps its "!").
# Replaced one for one, so spans stay exact. "|" is left alone: it is A1111's alternation ("[a|b]").
_INNER_SYMBOL_RE = re.compile(r"(?<=[^\W\d_])[!¡€](?=[^\W\d_])|(?<=[^\W\d_])€")
_INNER_SYMBOLS = {"!": "i", "¡": "i", "€": "e"}

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
_REPEAT_RE = re.compile(r"(.)\1+")
_LONG_REPEAT_RE = re.compile(r"(.)\1\1+")
# Scripts written without spaces (and Hangul, whose particles glue to nouns): matched by substring.
_CJK_RE = re.compile(r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


@cache
def _skeleton_table() -> dict[str, str]:
    """Character -> the ASCII letter or digit it is confusable with, from TR39's table."""
    data = json.loads(files("confusable_homoglyphs").joinpath("confusables.json").read_text(encoding="utf-8"))
    table: dict[str, str] = {}

    def offer(char: str, ascii_char: str) -> None:
        if len(char) != 1 or char.isascii() or not ascii_char.isalnum():
            return
        if unicodedata.name(char, "").startswith(_NO_SKELETON):
            return
        current = table.get(char)
        if current is None or (current.isdigit() and ascii_char.isalpha()):  # letters win over digits
            table[char] = ascii_char.lower()

    for key, entries in data.items():
        glyphs = [e["c"].strip("\u200e\u200f") for e in entries]
        if len(key) == 1 and key.isascii():
            for g in glyphs:
                offer(g, key)
        else:
            for g in glyphs:
                if len(g) == 1 and g.isascii():
                    offer(key, g)
    for char, latin in list(table.items()):  # "к" through "К"
        low = char.lower()
        if len(low) == 1 and low != char and low not in table:
            table[low] = latin
    table.update(_EXTRA)
    return table


def _fold_char(ch: str) -> tuple[str, str]:
    """One original character -> (native, skeleton) replacements of equal length ('' when invisible)."""
    if ch in _INVISIBLE or ord(ch) in _SKIN_TONES:
        return "", ""
    if ch in _EMOJI_WORDS:
        word = _EMOJI_WORDS[ch]
        return word, word
    cat = unicodedata.category(ch)
    if cat in _DROPPED_CATEGORIES:
        return "", ""
    if cat in ("Zs", "Zl", "Zp", "Cc"):
        return " ", " "
    named = _NAMED_LETTER.match(unicodedata.name(ch, ""))
    if named:
        letter = named.group(1).lower()
        return letter, letter
    skel_table = _skeleton_table()
    native: list[str] = []
    skel: list[str] = []
    composed = unicodedata.normalize("NFKC", ch)
    low = composed.lower()
    if low in _EXPAND:
        return _EXPAND[low], _EXPAND[low]
    for c in unicodedata.normalize("NFKD", composed):
        if c in _INVISIBLE or unicodedata.category(c) in _DROPPED_CATEGORIES:
            continue
        low = c.lower()
        if low in _EXPAND or len(low) != 1:
            text = _EXPAND.get(low, low)
            native.append(text)
            skel.append(text)
            continue
        native.append(low)
        skel.append(skel_table.get(c) or skel_table.get(low) or low)
    return "".join(native).translate(_WORD_SYMBOLS), "".join(skel).translate(_WORD_SYMBOLS)


class _FoldTable(dict):
    """`str.translate` table: code point -> one of the two forms, filled on first sight of a character."""

    def __init__(self, which: int):
        super().__init__()
        self.which = which

    def __missing__(self, code: int) -> str:
        if len(self) > _FOLD_TABLE_LIMIT:  # hostile input with endless distinct characters
            self.clear()
        value = self[code] = _fold_char(chr(code))[self.which]
        return value


_FOLD_TABLE_LIMIT = 200_000
_NATIVE = _FoldTable(0)
_FOLD = _FoldTable(1)


class Normalized:
    """Normalised text (skeleton form), its native-script twin, and the way back to the original."""

    __slots__ = ("source", "text", "_native", "_ends")

    def __init__(self, source: str, text: str, native: str | None, identity: bool):
        self.source = source
        self.text = text
        # None when it equals `text`; False until asked for: only words whose skeleton is not ASCII
        # have a native form worth keeping, so most prompts never need the second fold
        self._native: str | None | bool = native if identity else False
        # Per original character, where its normalised form ends; filled only as far as a reported
        # span needs (None: normalising kept every index).
        self._ends: list[int] | None = None if identity else []

    @property
    def native(self) -> str | None:
        """The native-script form (None when it equals `text`)."""
        if self._native is False:
            native = _inner_symbols(self.source.translate(_NATIVE))
            self._native = native if native != self.text else None
        return self._native

    def _ends_past(self, k: int) -> list[int]:
        """The end offsets, filled at least until they pass normalised index k."""
        ends = self._ends
        source = self.source
        while len(ends) < len(source) and (not ends or ends[-1] <= k):
            chunk = source[len(ends):len(ends) + _SPAN_CHUNK]
            sizes = map(len, map(_FOLD.__getitem__, map(ord, chunk)))
            ends.extend(islice(accumulate(sizes, initial=ends[-1] if ends else 0), 1, None))
        return ends

    @property
    def origin(self) -> tuple[int, ...] | None:
        """Per normalised character, the index of its original character (None: the same index)."""
        if self._ends is None:
            return None
        ends = self._ends_past(len(self.text))
        return tuple(bisect_right(ends, k) for k in range(len(self.text)))

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original-text span `[a, b)` covering normalised characters `[start, end)`."""
        if self._ends is None:
            return start, end
        ends = self._ends_past(end - 1)
        return bisect_right(ends, start), bisect_right(ends, end - 1) + 1


_SPAN_CHUNK = 512
_REPEAT_MIN = 2_000  # prompts at least this long may be folded per distinct space-separated piece


def _inner_symbols(text: str) -> str:
    if "!" in text or "¡" in text or "€" in text:
        return _INNER_SYMBOL_RE.sub(lambda m: _INNER_SYMBOLS[m.group()], text)
    return text


def normalize(text: str) -> Normalized:
    if text.isascii():
        return Normalized(text, _inner_symbols(text.lower().translate(_WORD_SYMBOLS)), None, identity=True)
    return Normalized(text, _inner_symbols(_fold(text)), None, identity=False)


def _fold(text: str) -> str:
    """`text.translate(_FOLD)`. That costs a dictionary lookup per character; a long prompt that repeats
    the same few words is folded once per distinct word instead (the same result: folding is per
    character, so it can be done piece by piece)."""
    if len(text) < _REPEAT_MIN:
        return text.translate(_FOLD)
    pieces = text.split(" ")
    distinct = set(pieces)
    if len(distinct) * 4 > len(pieces):
        return text.translate(_FOLD)
    folded = {piece: piece.translate(_FOLD) for piece in distinct}
    return _FOLD[32].join(map(folded.__getitem__, pieces))


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


def is_cjk(word: str) -> bool:
    return _CJK_RE.search(word) is not None


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
        if self._weights is not None:
            return k in self._weights
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

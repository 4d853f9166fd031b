"""Normalise prompt text; `safety.tokens` splits it into the words rule lists are matched against.

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
from functools import cache
from importlib.resources import files
from itertools import accumulate, islice

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

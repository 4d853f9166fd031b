"""The prompt audit's age parser: numbers that are someone's age, read with their context.

It visits only the words the term index flagged (age cues, number words; see
`safety.prompt_audit.matcher.Flagged`), so a 20,000-character prompt stays linear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import compress

from safety.normalize import is_cjk
from safety.prompt_audit.matcher import AGE_CUE, NUMBER_WORD, Flagged
from safety.prompt_audit.rules import _HITS_PER_GROUP, AgeRule, _canon_set, _phrase_tokens
from safety.tokens import Tokens

_YEAR_APOSTROPHES = frozenset("'\u2019\u2018`\u00b4")  # a separator ending in one: "'12"
_CJK_DIGITS = {"〇": 0, "零": 0, "一": 1, "二": 2, "两": 2, "兩": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
               "八": 8, "九": 9}
_CJK_NUMBER_RE = re.compile(r"([〇零一二两兩三四五六七八九十]{1,3})")


def _cjk_number(text: str) -> int | None:
    """A Chinese/Japanese numeral up to 99 ("十四" -> 14, "二十" -> 20); None if it is not one."""
    if "十" in text:
        tens, _, units = text.partition("十")
        if "十" in units or (tens and tens not in _CJK_DIGITS) or (units and units not in _CJK_DIGITS):
            return None
        return (_CJK_DIGITS[tens] if tens else 1) * 10 + (_CJK_DIGITS[units] if units else 0)
    return _CJK_DIGITS.get(text) if len(text) == 1 else None


@dataclass
class _Ages:
    minors: list[tuple[int, int]]  # (first, last) words of each minor age
    adults: list[tuple[int, int]]  # explicit adult ages ("40 years old", "18+")


class _AgeMatcher:
    """Ages written with a cue that says the number is an age, and whose it is.

    The cue comes after the number ("15 years old", "15yo", "15 Jahre", "15 лет", "15歳", "15th
    birthday") or before it ("aged 15", "age of 15", "turned 15", "almost 18", "girl, 15", "she is 15",
    "born in 2012", "class of 2032"). A duration is not an age: "15 years later", "for 15 years",
    "16 years of marriage". A number right after an animal ("a cat, 15 years old") is the animal's.
    """

    def __init__(self, rule: AgeRule, current_year: int, animals: frozenset[str]):
        self.max_age = rule.max_age
        self.year = current_year
        self.words = {"".join(_phrase_tokens(w)): v for w, v in rule.number_words.items()}
        self.tens = {"".join(_phrase_tokens(w)): v for w, v in rule.tens_words.items()}
        self.ordinal_words = {"".join(_phrase_tokens(w)): v for w, v in rule.ordinal_words.items()}
        self.years = _canon_set(rule.years)
        self.years_old = _canon_set(rule.years_old)
        self.old = _canon_set(rule.old)
        self.before = _canon_set(rule.before)
        self.of = _canon_set(rule.of)
        self.ordinals = _canon_set(rule.ordinals)
        self.ordinal_nouns = _canon_set(rule.ordinal_nouns)
        self.grade_nouns = _canon_set(rule.grade_nouns)
        self.not_after = _canon_set(rule.not_after)
        self.not_before = _canon_set(rule.not_before)
        self.turned = _canon_set(rule.turned)
        self.approx = _canon_set(rule.approx)
        self.person_nouns = _canon_set(rule.person_nouns)
        self.copulas = _canon_set(rule.copulas)
        self.birth = _canon_set(rule.birth)
        self.birth_joiners = _canon_set(rule.birth_joiners)
        self.birth_after = _canon_set(rule.birth_after)
        self.class_of = _canon_set(rule.class_of)
        self.aged_with = _canon_set(rule.aged_with)
        self.animals = animals
        cjk_units = [u for u in (*rule.years_old, *rule.years) if is_cjk(u)]
        self.cjk_age = re.compile(_CJK_NUMBER_RE.pattern + "(" + "|".join(
            re.escape("".join(_phrase_tokens(u))) for u in cjk_units) + ")") if cjk_units else None
        # Words that make a number nearby (two words at most) someone's age; "of", "is", "in" count
        # only next to one of these ("age of 15", "she is 15", "born in 2012").
        self.cues = (self.years | self.years_old | self.ordinals | self.before | self.turned | self.approx
                     | self.person_nouns | self.birth | self.birth_after | self.class_of | self.grade_nouns)

    def _values(self, tokens: Tokens, number_words: list[int]) -> Iterable[tuple[int, tuple[int, int]]]:
        """(word index, (number, its last word)) for digits, number words and "twenty one", in text order."""
        canon, words, tens = tokens.canon, self.words, self.tens
        spelled: dict[int, tuple[int, int]] = {}
        n = len(canon)
        for i in number_words:
            w = canon[i]
            if w in tens and i + 1 < n and canon[i + 1] in words and 0 < words[canon[i + 1]] < 10:
                spelled[i] = (tens[w] + words[canon[i + 1]], i + 1)
            elif w in words and not tokens.is_number(i) and (i == 0 or canon[i - 1] not in tens):
                spelled[i] = (words[w], i)
        if not spelled:  # numbers come in text order, worked out as the reading goes on
            return ((i, (v, i)) for i, v in tokens.iter_numbers())
        values = {i: (v, i) for i, v in tokens.numbers.items()}
        values.update(spelled)
        return sorted(values.items())

    def scan(self, tokens: Tokens, flagged: Flagged, minors_needed: bool = True) -> _Ages:
        """Ages in the text; `flagged` holds the word flags from the term index (AGE_CUE, NUMBER_WORD).
        Stops once it has enough evidence: `_HITS_PER_GROUP` minor ages where minors count (an adult
        age found later would only cancel weak words, and a minor age is not weak), else as many
        adult ages (in the negative prompt, where they are what counts)."""
        canon = tokens.canon
        ages = _Ages([], [])
        cue_at = set(flagged.at(AGE_CUE))
        if cue_at:  # a digit's leet form ("57" -> "st") is never a cue word
            words = tokens.words
            cue_at.difference_update([i for i in compress(cue_at, map(str.isdecimal, map(words.__getitem__, cue_at)))
                                      if tokens.is_number(i)])
        if cue_at or tokens.cjk:
            values = self._values(tokens, flagged.at(NUMBER_WORD))
            reach = 6 if tokens.has_weights else 2  # cues may sit past an attention weight: "(15:1.0) yo"
            n = len(canon)
            memo: dict[tuple, tuple[int, int, int] | None] = {}  # a hostile prompt repeats its ages
            for i, (v, j) in values:
                if len(ages.minors if minors_needed else ages.adults) >= _HITS_PER_GROUP:
                    break
                if "+" not in tokens.gap(j)[:1] and not any(k in cue_at for k in range(i - reach, j + reach + 1)):
                    continue  # the common case, decided without looking further
                lo, hi = max(0, i - 4), min(n - 1, j + 4)
                key = (tokens.piece(lo, hi), i - lo, j - lo)
                if key in memo:
                    cached = memo[key]
                    found = None if cached is None else (cached[0], cached[1] + i, cached[2] + i)
                else:
                    found = self._read(tokens, i, j, v)
                    memo[key] = None if found is None else (found[0], found[1] - i, found[2] - i)
                if found is None:
                    continue
                age, first, last = found
                if age < 0:
                    continue
                if age <= self.max_age:
                    if not self._animals_own(tokens, first):
                        ages.minors.append((first, last))
                elif age < 130:
                    ages.adults.append((first, last))
        elif "+" in tokens.text:
            for i, v in tokens.iter_numbers():  # "18+" needs no cue word
                if v < 130 and "+" in tokens.gap(i)[:1] and self._read(tokens, i, i, v) is not None and v > self.max_age:
                    ages.adults.append((i, i))
        for i in cue_at:
            if i > 0 and canon[i] in self.grade_nouns and canon[i - 1] in self.ordinal_words:
                ages.minors.append((i - 1, i))  # "seventh grader"
        if self.cjk_age is not None:
            memo: dict[str, list[int]] = {}
            for i in tokens.cjk:
                word = canon[i]
                found_ages = memo.get(word)
                if found_ages is None:
                    found_ages = memo[word] = [a for m in self.cjk_age.finditer(word)
                                               if (a := _cjk_number(m.group(1))) is not None]
                for age in found_ages:
                    (ages.minors if age <= self.max_age else ages.adults).append((i, i))
                if len(ages.minors if minors_needed else ages.adults) >= _HITS_PER_GROUP:
                    break
        return ages

    def _read(self, tokens: Tokens, i: int, j: int, v: int) -> tuple[int, int, int] | None:
        """(age, first word, last word) if the number at words i..j is someone's age."""
        canon = tokens.canon
        nxt, after = _neighbours(tokens, j, +1)
        prev, before = _neighbours(tokens, i, -1)
        at = lambda k: canon[k] if k is not None and not tokens.is_number(k) else ""  # noqa: E731
        is_digits = tokens.is_number(i)
        if at(nxt) in self.years_old:
            return v, i, nxt
        if at(nxt) in self.years:
            if at(after) in self.old:
                return v, i, after
            if at(after) in self.of:
                third = _neighbours(tokens, after, +1)[0]
                return (v, i, third) if at(third) in self.before else None  # "of age" / "of marriage"
            if at(after) in self.not_after or at(prev) in self.not_before:
                return None
            return v, i, nxt
        if at(nxt) in self.birth_after and v > 1900:
            return self.year - v, i, nxt
        if at(nxt) in self.ordinals and at(after) in self.ordinal_nouns:
            return v, i, after
        if at(nxt) in self.grade_nouns and v <= 13 and "." in tokens.gap(j)[:1]:  # German "7. Klasse"
            return v, i, nxt
        if at(prev) in self.grade_nouns and v <= 13:  # "grade 7"
            return v, prev, j
        if at(prev) in self.before or (at(prev) in self.of and at(before) in self.before):
            return v, (before if at(prev) in self.of else prev), j
        if at(prev) in self.turned:
            return v, prev, j
        if at(prev) in self.approx and v <= self.max_age + 1:
            return v - 1, prev, j
        # "born in '12", "class of '32": a year written with two digits after an apostrophe
        short_year = v < 100 and is_digits and i > 0 and tokens.gap(i - 1)[-1:] in _YEAR_APOSTROPHES
        if v > 1900 or short_year:
            year = self._full_year(v) if short_year else v
            if at(prev) in self.birth or (at(prev) in self.birth_joiners and at(before) in self.birth):
                return self.year - year, (before if at(prev) in self.birth_joiners else prev), j
            graduation = self.year - self.year % 100 + v if short_year else v  # a class year may lie ahead
            if at(prev) in self.of and at(before) in self.class_of and graduation >= self.year + 5:
                return 0, before, j  # still at school
            if not short_year:
                return None
        if "+" in tokens.gap(j)[:1] and is_digits:
            return v, i, j  # "18+"
        if is_digits and 5 <= v:
            if at(prev) in self.person_nouns and not _barrier(tokens, prev, i, allow=",("):
                return v, prev, j  # "girl, 13", "girl (13)"
            if at(prev) in self.copulas and at(before) in self.person_nouns:
                return v, before, j  # "she is 13"
            if v >= 8 and at(nxt) in self.person_nouns and not _barrier(tokens, j, nxt, allow=""):
                return v, i, nxt  # "13 girl" (a count would take the plural)
        if 5 <= v and at(prev) in self.aged_with and at(before) in self.person_nouns and (
                nxt is None or _barrier(tokens, j, nxt, allow="")):
            return v, before, j  # "Mädchen mit 13", "a girl of 12," (nothing counted after the number)
        return None

    def _full_year(self, short: int) -> int:
        """The birth year a two-digit year stands for: this century unless that is still to come."""
        century = self.year - self.year % 100
        return century + short if century + short <= self.year else century - 100 + short

    def _animals_own(self, tokens: Tokens, first: int) -> bool:
        """True when the age follows an animal with no person word in between ("a cat, 15 years old")."""
        canon = tokens.canon
        for k in range(first - 1, max(-1, first - 4), -1):
            if canon[k] in self.person_nouns:
                return False
            if canon[k] in self.animals:
                return True
        return False


def _barrier(tokens: Tokens, a: int, b: int, allow: str) -> bool:
    """True when the text between words a and b holds punctuation other than spaces and `allow`."""
    return any(not (c.isspace() or c in allow) for k in range(a, b) for c in tokens.gap(k))


def _neighbours(tokens: Tokens, i: int, step: int) -> tuple[int | None, int | None]:
    """The next two words from i in direction `step`, looking past attention weights
    ("(15:1.0) yo" reads as "15 yo"); a weight has at most two digit words, so the search is bounded."""
    n = len(tokens.canon)
    if not tokens.has_weights:
        a, b = i + step, i + 2 * step
        return (a if 0 <= a < n else None), (b if 0 <= b < n else None)
    out: list[int] = []
    j = i + step
    while 0 <= j < n and len(out) < 2 and abs(j - i) <= 6:
        if not tokens.is_weight(j):
            out.append(j)
        j += step
    out += [None] * (2 - len(out))
    return out[0], out[1]



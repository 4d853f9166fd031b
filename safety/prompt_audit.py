"""Prompt audit: layered rules from `configs/safety/prompt_audit.yaml` matched on normalised tokens.

Layers, in the order a prompt meets them:
1. normalisation (`safety.normalize`): Unicode look-alikes (TR39), invisible marks, enclosed and
   small-capital letters, emoji, leetspeak; words split into pieces ("nu de", "n.u.d.e") are joined
   again when the joined form is a rule term and the pieces are not all ordinary words;
2. lexicons: per-language term files (`lexicon/*.yaml` beside the rules) merged into the term
   groups; each group marks *signals* (`mature`, `minor`, `person`, `nonconsent`, ...) and/or carries
   its own action. A hit can be cancelled by context: `except_near` words ("freshman" near
   "college", "baby" next to an animal), `except_before` phrases ("mom of two kids"), and for
   `weak_terms` an explicit adult age in the prompt ("18 year old teen"). Nudity said without a
   nudity word ("no clothes", "panties off") is read from a negation or removal next to a garment;
3. an age parser with context (`ages`): "N years old", "N yo", "aged N", "N Jahre/años/ans/anni/лет/
   歳/sai/살", number words in those languages, grades, birth years, "just turned N", "she is N";
   durations ("16 years of marriage", "15 years later") and animals' ages are not ages, and an adult
   age in the NEGATIVE prompt (excluding adulthood) is a minor signal;
4. protected persons (`safety.persons`): a list of public figures plus takedown names, fuzzy
   (`with_person_names` adds takedown names in microseconds: only the new names are indexed);
5. an optional semantic text classifier (`safety.text_classifier`, ONNX) whose labels add signals;
6. `combinations` turn signals of both prompts into actions (minor + mature -> block, person +
   mature -> block, nonconsent + mature -> block, ...).
A prompt or negative prompt longer than `max_prompt_chars` is blocked, never truncated.

Matching is token-based: one cached lookup per distinct word gives its term groups and flags
saying which other layer cares about it (age cue, number word, name part), so the other layers
visit only those words; a phrase table and Aho-Corasick automata cover spaced-out letters and
scripts written without spaces. Time is linear in the prompt length, evidence is capped per rule,
and a hostile 20,000-character prompt audits in milliseconds. Every reason carries its rule id and
the span of the ORIGINAL text it matched. The lexicons are hand-written: no package on PyPI ships
multilingual lists of sexual, minor and harm vocabulary for moderation.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safety.errors import RulesInvalid, SafetyError
from safety.normalize import (
    Tokens,
    has_long_repeat,
    is_cjk,
    normalize,
    shorten_repeats,
    squeeze,
    tokenize,
)
from safety.persons import PersonIndex, load_names
from safety.text_classifier import ClassifierConfig, TextClassifier
from safety.verdict import ALLOW, Action, Reason, Verdict
from safety.wordlist import ordinary_words

RULES_FILE = "prompt_audit.yaml"
FIELDS = ("prompt", "negative")
FieldName = Literal["prompt", "negative"]
MAX_REASONS_PER_RULE = 5  # evidence enough; a hostile prompt must not produce thousands of reasons
_HITS_PER_GROUP = 16  # hits kept per group and field (min_hits counts distinct terms among them)


# ---------------------------------------------------------------------------------------------
# Typed rules (the YAML schema)


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _words(values: list[str]) -> list[str]:
    out = []
    for v in values:
        if not isinstance(v, str) or not _phrase_tokens(v):
            raise ValueError(f"term {v!r} has no letters or digits")
        out.append(v)
    return out


class TermGroup(_Rule):
    id: str = Field(min_length=1)
    message: str = ""
    signal: str | list[str] | None = None
    action: Literal["block", "review"] | None = None
    when: list[str] = []
    fields: list[FieldName] = ["prompt"]
    terms: list[str] = []
    prefixes: list[str] = []
    weak_terms: list[str] = []  # terms an explicit adult age in the prompt cancels ("18 year old teen")
    weak_prefixes: list[str] = []
    quiet: bool = False  # context only: its signal counts, it gives no reason of its own
    min_hits: int = Field(1, ge=1)  # distinct terms needed in one field ("dress, shirt" in a negative)
    except_near: list[str] = []  # any of these words within `near_window` on either side cancels a hit
    except_near_groups: list[str] = []  # ... and the terms of these groups
    except_before: list[str] = []  # any of these phrases ending within `near_window` before cancels it
    near_window: int = Field(3, ge=1, le=10)

    _check_terms = field_validator("terms", "prefixes", "weak_terms", "weak_prefixes", "except_near",
                                   "except_before")(_words)

    @model_validator(mode="after")
    def _does_something(self) -> TermGroup:
        if not self.signal and not self.action:
            raise ValueError(f"group {self.id!r} needs a signal or an action")
        if not (self.terms or self.prefixes or self.weak_terms or self.weak_prefixes):
            raise ValueError(f"group {self.id!r} has no terms")
        return self

    @property
    def signals(self) -> tuple[str, ...]:
        if self.signal is None:
            return ()
        return (self.signal,) if isinstance(self.signal, str) else tuple(self.signal)


class YoungNounRule(_Rule):
    id: str
    message: str = ""
    window: int = Field(3, ge=1, le=10)
    adjectives: list[str]
    nouns: list[str] = []
    noun_prefixes: list[str] = []

    _check_terms = field_validator("adjectives", "nouns", "noun_prefixes")(_words)


class UncoveredRule(_Rule):
    """Nudity said without a nudity word: a negation before a garment ("no clothes", "without a
    stitch of clothing", "ohne Höschen") or a removal after it ("clothes removed", "panties off")."""

    id: str
    message: str = ""
    window: int = Field(4, ge=1, le=8)  # words from the negation to the garment
    negations: list[str]
    garments: list[str]
    removals: list[str] = []  # within two words after the garment

    _check_terms = field_validator("negations", "garments", "removals")(_words)


class AgeRule(_Rule):
    """The vocabulary of ages, merged over all languages (see `lexicon/*.yaml`)."""

    id: str
    message: str = ""
    max_age: int = Field(17, ge=1, le=25)
    number_words: dict[str, int]
    tens_words: dict[str, int] = {}  # "twenty" in "twenty one"
    years: list[str]  # "N years": an age unless a duration ("15 years later", "16 years of marriage")
    years_old: list[str]  # already mean "years old" ("yo", "jährig", "sai", "歳", "살")
    old: list[str]
    before: list[str]  # "aged 15", "age of 15"
    of: list[str] = ["of"]
    ordinals: list[str] = ["st", "nd", "rd", "th"]
    ordinal_nouns: list[str] = []  # "15th birthday", "5th grade"
    ordinal_words: dict[str, int] = {}  # "seventh" (grade)
    grade_nouns: list[str] = []  # "seventh grade(r)", "grade 7"
    not_after: list[str] = []  # "15 years later / ago / in prison"
    not_before: list[str] = []  # "for 15 years", "after 15 years"
    turned: list[str] = []  # "just turned 13"
    approx: list[str] = []  # "almost 18", "under 18": the age is below the number
    person_nouns: list[str] = []  # "girl, 13", "she is 13", "13 girl"
    copulas: list[str] = []
    birth: list[str] = []  # "born in 2012"
    birth_joiners: list[str] = []
    birth_after: list[str] = []  # "2012年生まれ", "2012년생"
    class_of: list[str] = []  # "class of 2032"
    animal_groups: list[str] = []  # groups naming animals: "a cat, 15 years old" is the animal's age
    negative_adult_group: str | None = None  # group whose minor signal an adult age in the negative gives

    _check_terms = field_validator(
        "years", "years_old", "old", "before", "of", "ordinals", "ordinal_nouns", "grade_nouns", "not_after",
        "not_before", "turned", "approx", "person_nouns", "copulas", "birth", "birth_joiners", "birth_after",
        "class_of")(_words)


class PersonNames(_Rule):
    id: str
    message: str = ""
    fields: list[FieldName] = ["prompt"]
    names: list[str] = []
    file: str | None = None  # one name per line, beside the rules

    _check_terms = field_validator("names")(_words)


class Combination(_Rule):
    id: str
    message: str = ""
    all: list[str] = Field(min_length=2)
    unless: list[str] = []
    action: Literal["block", "review"]


class PromptRules(_Rule):
    version: Literal[1] = 1
    max_prompt_chars: int = Field(20_000, ge=100)
    lexicons: list[str] = []
    term_groups: list[TermGroup]
    benign_phrases: list[str] = []
    young_nouns: YoungNounRule
    uncovered: UncoveredRule
    ages: AgeRule
    person_names: PersonNames
    text_classifier: ClassifierConfig | None = None
    combinations: list[Combination] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> PromptRules:
        ids = [g.id for g in self.term_groups] + [self.young_nouns.id, self.uncovered.id, self.ages.id,
                                                  self.person_names.id]
        ids += [c.id for c in self.combinations]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate rule ids: {sorted(dupes)}")
        groups = {g.id for g in self.term_groups}
        refs = [*self.ages.animal_groups, *(r for g in self.term_groups for r in g.except_near_groups)]
        unknown = sorted(set(refs) - groups)
        if unknown:
            raise ValueError(f"unknown groups referenced: {unknown}")
        neg = self.ages.negative_adult_group
        if neg is not None and not any(g.id == neg and "negative" in g.fields for g in self.term_groups):
            raise ValueError(f"ages.negative_adult_group {neg!r} is not a group that reads the negative prompt")
        return self


class LexiconFile(_Rule):
    """One language's words, merged into the groups and vocabularies of the main rules file."""

    language: str
    terms: dict[str, list[str]] = {}  # group id -> terms
    prefixes: dict[str, list[str]] = {}
    weak_terms: dict[str, list[str]] = {}
    weak_prefixes: dict[str, list[str]] = {}
    benign_phrases: list[str] = []
    young_adjectives: list[str] = []
    young_nouns: list[str] = []
    uncovered_negations: list[str] = []
    uncovered_garments: list[str] = []
    uncovered_removals: list[str] = []
    ages: dict[str, list[str] | dict[str, int]] = {}


def _merge_lexicons(raw: dict, rules_dir: Path) -> dict:
    """The main rules document with every lexicon file's words added to it."""
    groups = {g.get("id"): g for g in raw.get("term_groups", []) if isinstance(g, dict)}
    for name in raw.get("lexicons", []):
        path = rules_dir / name
        lex = LexiconFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        for key, table in (("terms", lex.terms), ("prefixes", lex.prefixes), ("weak_terms", lex.weak_terms),
                           ("weak_prefixes", lex.weak_prefixes)):
            for gid, words in table.items():
                if gid not in groups:
                    raise ValueError(f"{path}: unknown group {gid!r}")
                groups[gid][key] = list(groups[gid].get(key, [])) + words
        raw["benign_phrases"] = list(raw.get("benign_phrases", [])) + lex.benign_phrases
        young = raw.setdefault("young_nouns", {})
        young["adjectives"] = list(young.get("adjectives", [])) + lex.young_adjectives
        young["nouns"] = list(young.get("nouns", [])) + lex.young_nouns
        uncovered = raw.setdefault("uncovered", {})
        for key, words in (("negations", lex.uncovered_negations), ("garments", lex.uncovered_garments),
                           ("removals", lex.uncovered_removals)):
            uncovered[key] = list(uncovered.get(key, [])) + words
        ages = raw.setdefault("ages", {})
        for key, value in lex.ages.items():
            if key not in AgeRule.model_fields:
                raise ValueError(f"{path}: unknown ages field {key!r}")
            if isinstance(value, dict):
                ages[key] = {**ages.get(key, {}), **value}
            else:
                ages[key] = list(ages.get(key, [])) + value
    return raw


def load_rules(rules_dir: Path) -> PromptRules:
    rules_dir = Path(rules_dir)
    path = rules_dir / RULES_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("the rules file must be a mapping")
        return PromptRules.model_validate(_merge_lexicons(raw, rules_dir))
    except (OSError, yaml.YAMLError, ValidationError, ValueError, TypeError, AttributeError) as exc:
        raise RulesInvalid(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Compiled matcher


@functools.lru_cache(maxsize=65_536)
def _phrase_tokens(text: str) -> tuple[str, ...]:
    """A rule term as the canonical tokens a prompt containing it would produce."""
    return tuple(tokenize(normalize(text)).canon)


def _canon_set(words: Iterable[str]) -> frozenset[str]:
    return frozenset("".join(_phrase_tokens(w)) for w in words)


@dataclass(frozen=True, eq=False)
class _Group:
    """One compiled rule: what a hit means."""

    id: str
    message: str
    signals: tuple[str, ...]
    action: Action | None
    when: frozenset[str]
    fields: frozenset[str]
    role: Literal["term", "benign", "young_adj", "young_noun", "negation", "garment", "removal"] = "term"
    weak: bool = False
    quiet: bool = False
    min_hits: int = 1
    except_near: frozenset[str] = frozenset()
    except_before: tuple[tuple[str, ...], ...] = ()
    near_window: int = 3

    @functools.cached_property
    def cancellable(self) -> bool:
        return bool(self.except_near or self.except_before)

    @functools.cached_property
    def except_before_by_last(self) -> dict[str, list[tuple[str, ...]]]:
        """`except_before` phrases by their last word: one lookup per word before a hit."""
        out: dict[str, list[tuple[str, ...]]] = {}
        for phrase in self.except_before:
            out.setdefault(phrase[-1], []).append(phrase)
        return out


class _AhoCorasick:
    """Substring automaton over canonical terms, used on the letters of spaced-out runs ("t e e n")."""

    def __init__(self, patterns: dict[str, tuple[int, ...]]):
        goto: list[dict[str, int]] = [{}]
        out: list[list[tuple[int, tuple[int, ...]]]] = [[]]
        for word, groups in patterns.items():
            node = 0
            for ch in word:
                nxt = goto[node].get(ch)
                if nxt is None:
                    goto.append({})
                    out.append([])
                    nxt = len(goto) - 1
                    goto[node][ch] = nxt
                node = nxt
            out[node].append((len(word), groups))
        fail = [0] * len(goto)
        queue = list(goto[0].values())
        for node in queue:
            for ch, nxt in goto[node].items():
                queue.append(nxt)
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                cand = goto[f].get(ch, 0)
                fail[nxt] = cand if cand != nxt else 0
                out[nxt] = out[nxt] + out[fail[nxt]]
        self._goto, self._fail, self._out = goto, fail, out

    def finditer(self, text: str) -> Iterable[tuple[int, int, tuple[int, ...]]]:
        """(start, end, groups) of every pattern occurrence; linear in len(text) plus matches."""
        goto, fail, out = self._goto, self._fail, self._out
        node = 0
        for i, ch in enumerate(text):
            while node and ch not in goto[node]:
                node = fail[node]
            node = goto[node].get(ch, 0)
            for length, groups in out[node]:
                yield i + 1 - length, i + 1, groups


_EMPTY: tuple = ()
_NO_PHRASES: dict = {}
_NOTHING: tuple = ((), _NO_PHRASES, 0)  # lookup result of a word that matches nothing

# What else a word is, besides a term: looked up once per distinct word together with the terms, so
# the other layers visit only the few words that concern them.
JOIN_START = 1  # the beginning of a one-word term ("nu" of "nude"): pieces may be joined from here
AGE_CUE = 2  # a word that says a nearby number is an age ("years", "aged", "歳")
NUMBER_WORD = 4  # "thirteen", "treize", "열세"
NAME_PART = 8  # a first name, surname or whole name on the protected-persons list
NAME_TYPO = 16  # a protected name written together with one typo ("taylorswfit")
_CACHE_LIMIT = 50_000
_JOIN_MAX_PIECES = 4
_JOIN_GAPS = frozenset({" ", ".", "-", "_", "·", "'", "*", "~", "+", "|", "/"})


class _TermIndex:
    """Canonical token -> groups, phrases by first token, prefixes by length, the run automaton,
    the split-word join table and the automaton for scripts written without spaces."""

    def __init__(self, entries: Sequence[tuple[int, str, bool]], flags: dict[str, int],
                 classify: Callable[[str], int] = lambda word: 0):
        single: dict[str, list[int]] = {}
        phrases: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        prefixes: dict[str, list[int]] = {}
        cjk: dict[str, list[int]] = {}
        for group, term, is_prefix in entries:
            words = _phrase_tokens(term)
            joined = "".join(words)
            if any(is_cjk(w) for w in words):
                cjk.setdefault(joined, []).append(group)  # matched as a substring: no word breaks
            if is_prefix:
                prefixes.setdefault(joined, []).append(group)
                continue
            single.setdefault(joined, []).append(group)  # also "taylorswift", "yearold"
            if len(words) > 1:
                phrases.setdefault(words[0], []).append((words[1:], group))
        self.single = {k: tuple(dict.fromkeys(v)) for k, v in single.items()}
        self.squeezed: dict[str, tuple[int, ...]] = {}
        for k, v in self.single.items():
            self.squeezed[squeeze(k)] = tuple(dict.fromkeys(self.squeezed.get(squeeze(k), ()) + v))
        # first word -> second word -> (the words after the first, group): one lookup rejects a phrase
        self.phrases: dict[str, dict[str, tuple[tuple[tuple[str, ...], int], ...]]] = {}
        for first, entries in phrases.items():
            by_second: dict[str, list[tuple[tuple[str, ...], int]]] = {}
            for rest, g in entries:
                by_second.setdefault(rest[0], []).append((rest, g))
            self.phrases[first] = {k: tuple(v) for k, v in by_second.items()}
        self.prefixes = {k: tuple(dict.fromkeys(v)) for k, v in prefixes.items()}
        self.prefix_lengths = sorted({len(k) for k in self.prefixes})
        self.runs = _AhoCorasick({**self.single, **self.prefixes})
        self.cjk = _AhoCorasick({k: tuple(dict.fromkeys(v)) for k, v in cjk.items()}) if cjk else None
        # Every beginning of a one-word term, so joining pieces stops as soon as it cannot succeed.
        self.join_starts = frozenset(k[:i] for k in (*self.single, *self.prefixes) for i in range(2, len(k) + 1))
        self.flags = dict(flags)
        self.classify = classify  # flags that need a computation, done once per distinct word
        for start in self.join_starts:
            self.flags[start] = self.flags.get(start, 0) | JOIN_START
        self._cache: dict[str, tuple[tuple[int, ...], dict, int]] = {}
        self._cjk_cache: dict[str, list[int]] = {}

    def lookup(self, canon: str) -> tuple[tuple[int, ...], dict[str, tuple[tuple[tuple[str, ...], int], ...]], int]:
        """Groups matched by one token on its own, phrases that may start with it, and its flags."""
        hit = self._cache.get(canon)
        if hit is not None:
            return hit
        groups = list(self.single.get(canon, _EMPTY))
        stem = canon[:-1] if len(canon) > 3 and canon[-1] == "s" else None
        if stem:
            groups += self.single.get(stem, _EMPTY)
        for k in self.prefix_lengths:
            if len(canon) < k:
                break
            groups += self.prefixes.get(canon[:k], _EMPTY)
        if not groups and has_long_repeat(canon):  # stretched words: "teeeen", "nuuude"
            groups += self.lookup(shorten_repeats(canon))[0]
            groups += self.squeezed.get(squeeze(canon), _EMPTY)
        phrases = self.phrases.get(canon, _NO_PHRASES)
        if stem and stem in self.phrases:
            phrases = {k: phrases.get(k, ()) + v for k, v in self.phrases[stem].items()} | {
                k: v for k, v in phrases.items() if k not in self.phrases[stem]}
        flags = self.flags.get(canon, 0) | self.classify(canon)
        result = (tuple(dict.fromkeys(groups)), phrases, flags) if groups or phrases or flags else _NOTHING
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[canon] = result
        return result

    def scan(self, tokens: Tokens, ordinary: frozenset[str]) -> tuple[list[tuple[int, int, int]], dict[int, int]]:
        """(group, first word, last word) of every term occurrence, and word index -> flags of the
        words that have any."""
        hits: list[tuple[int, int, int]] = []
        canon = tokens.canon
        n = len(canon)
        cache_get, lookup = self._cache.get, self.lookup
        found = [cache_get(w) or lookup(w) for w in canon]
        special = [i for i, r in enumerate(found) if r is not _NOTHING]
        flagged = {i: found[i][2] for i in special if found[i][2]}
        for i in special:
            groups, phrases, _ = found[i]
            for g in groups:
                hits.append((g, i, i))
            if phrases and i + 1 < n:
                nxt = canon[i + 1]
                candidates = phrases.get(nxt, ()) + (phrases.get(nxt[:-1], ()) if len(nxt) > 3 and nxt[-1] == "s" else ())
                for rest, g in candidates:
                    end = i + len(rest)
                    if end < n and all(_same(canon[i + 1 + k], w) for k, w in enumerate(rest)):
                        hits.append((g, i, end))
        for i, word in tokens.joined.items():  # "7een" split into 7 + een: the whole word too
            for g in lookup(word)[0]:
                hits.append((g, i, i + 1))
        for run in tokens.runs:
            letters = "".join(canon[i] for i in run)
            for start, end, groups in self.runs.finditer(letters):
                if end - start > 1:
                    for g in groups:
                        hits.append((g, run[start], run[end - 1]))
        if self.cjk is not None:
            for i in tokens.cjk:
                for g in self._cjk_groups(canon[i]):
                    hits.append((g, i, i))
        hits.extend(self._joins(tokens, found, flagged, ordinary))
        return hits, flagged

    def _cjk_groups(self, word: str) -> list[int]:
        """Groups whose terms occur inside a word written without spaces (cached per word)."""
        groups = self._cjk_cache.get(word)
        if groups is None:
            groups = [g for _, _, gs in self.cjk.finditer(word) for g in gs]
            if len(self._cjk_cache) >= _CACHE_LIMIT:
                self._cjk_cache.clear()
            self._cjk_cache[word] = groups
        return groups

    def _joins(self, tokens: Tokens, found: list, flagged: dict[int, int],
               ordinary: frozenset[str]) -> list[tuple[int, int, int]]:
        """Words split into multi-letter pieces ("nu de", "ch-ild", "lo_li"): the joined form counts when
        it is a term and not every piece is an ordinary word ("an al fresco" stays apart)."""
        canon, starts, out = tokens.canon, self.join_starts, []
        n = len(canon)
        for i in [i for i, f in flagged.items() if f & JOIN_START]:
            joined = canon[i]
            if found[i][0] or i + 1 >= n or len(out) >= _HITS_PER_GROUP:  # already a term on its own
                continue
            for j in range(i + 1, min(n, i + _JOIN_MAX_PIECES)):
                gap = tokens.gap(j - 1)
                if not gap or len(gap) > 2 or not _JOIN_GAPS.issuperset(gap):
                    break
                joined += canon[j]
                if joined not in starts:
                    break
                pieces = canon[i:j + 1]
                # A lone letter is not a word ("se x"), except "a" and "i" (also the leet form of "l").
                if max(map(len, pieces)) < 2 or all(p in ordinary and (len(p) > 1 or p in "ai") for p in pieces):
                    continue
                for g in self.lookup(joined)[0]:
                    out.append((g, i, j))
        return out


def _same(token: str, word: str) -> bool:
    return token == word or (len(token) > 3 and token[-1] == "s" and token[:-1] == word)


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
        self.animals = animals
        cjk_units = [u for u in (*rule.years_old, *rule.years) if is_cjk(u)]
        self.cjk_age = re.compile(_CJK_NUMBER_RE.pattern + "(" + "|".join(
            re.escape("".join(_phrase_tokens(u))) for u in cjk_units) + ")") if cjk_units else None
        # Words that make a number nearby (two words at most) someone's age; "of", "is", "in" count
        # only next to one of these ("age of 15", "she is 15", "born in 2012").
        self.cues = (self.years | self.years_old | self.ordinals | self.before | self.turned | self.approx
                     | self.person_nouns | self.birth | self.birth_after | self.class_of | self.grade_nouns)

    def _values(self, tokens: Tokens, number_words: list[int]) -> dict[int, tuple[int, int]]:
        """Word index -> (number, its last word) for digits, number words and "twenty one"."""
        canon, words, tens = tokens.canon, self.words, self.tens
        values = {i: (v, i) for i, v in tokens.numbers.items()}
        n = len(canon)
        for i in number_words:
            w = canon[i]
            if w in tens and i + 1 < n and canon[i + 1] in words and 0 < words[canon[i + 1]] < 10:
                values[i] = (tens[w] + words[canon[i + 1]], i + 1)
            elif w in words and i not in values and (i == 0 or canon[i - 1] not in tens):
                values[i] = (words[w], i)
        return values

    def scan(self, tokens: Tokens, flagged: dict[int, int], minors_needed: bool = True) -> _Ages:
        """Ages in the text; `flagged` holds the word flags from the term index (AGE_CUE, NUMBER_WORD).
        Stops once it has enough evidence: `_HITS_PER_GROUP` minor ages where minors count (an adult
        age found later would only cancel weak words, and a minor age is not weak), else as many
        adult ages (in the negative prompt, where they are what counts)."""
        canon = tokens.canon
        ages = _Ages([], [])
        cue_at = {i for i, f in flagged.items() if f & AGE_CUE}
        if cue_at:  # a digit's leet form ("5" -> "s") is never a cue word
            cue_at.difference_update(tokens.numbers)
        if cue_at or tokens.cjk:
            values = self._values(tokens, sorted(i for i, f in flagged.items() if f & NUMBER_WORD))
            reach = 6 if tokens.weights else 2  # cues may sit past an attention weight: "(15:1.0) yo"
            offsets, text, n = tokens.offsets, tokens.text, len(canon)
            memo: dict[str, tuple[int, int, int] | None] = {}  # a hostile prompt repeats its ages
            for i, (v, j) in sorted(values.items()):
                if len(ages.minors if minors_needed else ages.adults) >= _HITS_PER_GROUP:
                    break
                if "+" not in tokens.gap(j)[:1] and not any(k in cue_at for k in range(i - reach, j + reach + 1)):
                    continue  # the common case, decided without looking further
                lo, hi = max(0, i - 4), min(n - 1, j + 4)
                key = text[offsets[2 * lo + 1]:offsets[2 * hi + 2]] + f"|{i - lo}|{j - lo}"
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
            for i, v in tokens.numbers.items():  # "18+" needs no cue word
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
        numbers = tokens.numbers
        at = lambda k: canon[k] if k is not None and k not in numbers else ""  # noqa: E731
        is_digits = i in tokens.numbers
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
        if v > 1900:
            if at(prev) in self.birth or (at(prev) in self.birth_joiners and at(before) in self.birth):
                return self.year - v, (before if at(prev) in self.birth_joiners else prev), j
            if at(prev) in self.of and at(before) in self.class_of and v >= self.year + 5:
                return 0, before, j  # still at school
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
        return None

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
    if not tokens.weights:
        a, b = i + step, i + 2 * step
        return (a if 0 <= a < n else None), (b if 0 <= b < n else None)
    out: list[int] = []
    j = i + step
    while 0 <= j < n and len(out) < 2 and abs(j - i) <= 6:
        if j not in tokens.weights:
            out.append(j)
        j += step
    out += [None] * (2 - len(out))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# The auditor


def _reason(hit: tuple) -> Reason:
    """The reason for one hit, with its span in the ORIGINAL text (computed only when reported)."""
    group, field, first, last, norm, tokens = hit
    start, end = norm.span(tokens.span(first)[0], tokens.span(last)[1])
    return Reason(group.id, group.message, field, (start, end), norm.source[start:end])

_Hit = tuple  # (group, field, first word, last word, Normalized, Tokens)


class PromptAuditor:
    """Audits a prompt and its negative prompt; deterministic and linear in the text length.

    Real-person names come from the rules (`person_names.file` and `.names`) and, at run time, from
    takedowns: `auditor.with_person_names(names)` returns an auditor whose person matcher also
    knows them. It shares everything else with this one, so it is cheap enough to call on every
    takedown approval.
    """

    def __init__(self, rules: PromptRules, extra_person_names: Iterable[str] = (), *, rules_dir: Path | None = None,
                 _shared: PromptAuditor | None = None):
        self.rules = rules
        self.extra_person_names = tuple(dict.fromkeys(n for n in extra_person_names if _phrase_tokens(n)))
        if _shared is not None:
            self.__dict__.update({k: v for k, v in _shared.__dict__.items() if k.startswith("_c_")})
            self._persons = _shared._c_base_persons.extended(self.extra_person_names)
            return
        self._c_ordinary = ordinary_words()
        groups: list[_Group] = []
        entries: list[tuple[int, str, bool]] = []

        def add(group: _Group, terms: Iterable[str], prefixes: Iterable[str] = ()) -> None:
            groups.append(group)
            idx = len(groups) - 1
            entries.extend((idx, t, False) for t in terms)
            entries.extend((idx, p, True) for p in prefixes)

        terms_of = {g.id: [*g.terms] for g in rules.term_groups}
        for g in rules.term_groups:
            near = [*g.except_near, *(t for r in g.except_near_groups for t in terms_of[r])]
            compiled = _Group(g.id, g.message, g.signals, Action(g.action) if g.action else None, frozenset(g.when),
                              frozenset(g.fields), quiet=g.quiet, min_hits=g.min_hits, except_near=_canon_set(near),
                              except_before=tuple(_phrase_tokens(p) for p in g.except_before), near_window=g.near_window)
            add(compiled, g.terms, g.prefixes)
            if g.weak_terms or g.weak_prefixes:  # the same rule id, marked weak
                add(dataclasses.replace(compiled, weak=True), g.weak_terms, g.weak_prefixes)
        yn = rules.young_nouns
        add(_Group(yn.id, yn.message, (), None, frozenset(), frozenset(FIELDS), "young_adj"), yn.adjectives)
        add(_Group(yn.id, yn.message, (), None, frozenset(), frozenset(FIELDS), "young_noun"), yn.nouns, yn.noun_prefixes)
        uc = rules.uncovered
        for role, words in (("negation", uc.negations), ("garment", uc.garments), ("removal", uc.removals)):
            add(_Group(uc.id, uc.message, (), None, frozenset(), frozenset({"prompt"}), role), words)
        add(_Group("benign", "", (), None, frozenset(), frozenset(FIELDS), "benign"), rules.benign_phrases)
        self._c_groups = groups
        self._c_uncovered = _Group(uc.id, uc.message or "no clothing", ("mature",), None, frozenset(),
                                   frozenset({"prompt"}))
        self._c_young = _Group(yn.id, yn.message or "young person", ("minor",), None, frozenset(), frozenset({"prompt"}), weak=True)
        self._c_age_group = _Group(rules.ages.id, rules.ages.message or "minor age", ("minor",), None, frozenset(),
                                   frozenset({"prompt"}))
        neg_id = rules.ages.negative_adult_group
        self._c_negative_adult = next((gr for gr in groups if gr.id == neg_id), None)
        pn = rules.person_names
        self._c_person_group = _Group(pn.id, pn.message, ("person",), None, frozenset(), frozenset(pn.fields))
        animals = _canon_set(t for r in rules.ages.animal_groups for t in terms_of[r])
        self._c_ages = _AgeMatcher(rules.ages, datetime.date.today().year, animals)
        names = list(pn.names)
        if pn.file:
            if rules_dir is None:
                raise RulesInvalid("person_names.file needs the rules folder: use PromptAuditor.from_dir")
            names += load_names(Path(rules_dir) / pn.file)
        self._c_base_persons = PersonIndex(names)
        flags: dict[str, int] = {}
        for words, flag in ((self._c_ages.cues, AGE_CUE), ((*self._c_ages.words, *self._c_ages.tens), NUMBER_WORD),
                            (self._c_base_persons.keys, NAME_PART)):
            for w in words:
                flags[w] = flags.get(w, 0) | flag
        base_persons, ordinary = self._c_base_persons, self._c_ordinary
        self._c_index = _TermIndex(entries, flags, lambda w: NAME_TYPO if base_persons.may_be_typo(w, ordinary) else 0)
        self._c_classifier = None
        if rules.text_classifier is not None:
            self._c_classifier = TextClassifier.load(rules.text_classifier, rules_dir)
        self._persons = self._c_base_persons.extended(self.extra_person_names)

    @classmethod
    def from_dir(cls, rules_dir: Path, extra_person_names: Iterable[str] = ()) -> PromptAuditor:
        return cls(load_rules(rules_dir), extra_person_names, rules_dir=Path(rules_dir))

    def with_person_names(self, names: Iterable[str]) -> PromptAuditor:
        """A new auditor that also knows `names` (e.g. from takedowns); this one is unchanged.
        Only the names are indexed anew: lexicons, ages and the base person list are shared."""
        return PromptAuditor(self.rules, (*self.extra_person_names, *names), _shared=self)

    @property
    def person_count(self) -> int:
        return self._persons.count

    # -- matching ------------------------------------------------------------------------------

    def _field_hits(self, field: str, text: str) -> tuple[list[_Hit], list[tuple[int, int]]]:
        """Hits of every rule that fired in one field, and the explicit adult ages in it."""
        norm = normalize(text)
        tokens = tokenize(norm)
        if not tokens.canon:
            return [], []
        groups = self._c_groups
        raw, flagged = self._c_index.scan(tokens, self._c_ordinary)
        covered: set[int] = set()
        for g, first, last in raw:
            if groups[g].role == "benign":
                covered.update(range(first, last + 1))
        out: list[_Hit] = []
        adjectives: set[int] = set()
        nouns: list[tuple[int, int]] = []
        pairs: dict[str, list[tuple[int, int]]] = {"negation": [], "garment": [], "removal": []}
        by_group: dict[int, list[tuple[int, int]]] = {}
        for g, first, last in raw:
            group = groups[g]
            if group.role == "benign" or first in covered or field not in group.fields:
                continue
            if group.role == "young_adj":
                adjectives.add(last)
            elif group.role == "young_noun":
                nouns.append((first, last))
            elif group.role in pairs:
                pairs[group.role].append((first, last))
            else:
                kept = by_group.setdefault(g, [])
                # Enough evidence per rule: a hostile prompt repeating a word must not cost a context
                # check per repetition. Cancelled hits do not count towards the cap.
                if len(kept) < _HITS_PER_GROUP and not (
                        group.cancellable and self._cancelled(group, tokens, first, last)):
                    kept.append((first, last))
        for g, spans in by_group.items():
            group = groups[g]
            if group.min_hits > 1 and len({"".join(tokens.canon[a:b + 1]) for a, b in spans}) < group.min_hits:
                continue
            out.extend((group, field, first, last, norm, tokens) for first, last in spans)
        if field in self._c_young.fields and adjectives:
            window = self.rules.young_nouns.window
            for first, last in nouns:
                adj = next((first - k for k in range(1, window + 1) if first - k in adjectives), None)
                if adj is not None:
                    out.append((self._c_young, field, adj, last, norm, tokens))
        if pairs["garment"] and (pairs["negation"] or pairs["removal"]):
            out.extend((self._c_uncovered, field, first, last, norm, tokens)
                       for first, last in self._uncovered(tokens, pairs)[:_HITS_PER_GROUP])
        ages = self._c_ages.scan(tokens, flagged, minors_needed=field in self._c_age_group.fields)
        if field in self._c_age_group.fields:
            out.extend((self._c_age_group, field, first, last, norm, tokens)
                       for first, last in ages.minors[:_HITS_PER_GROUP])
        if field == "negative" and self._c_negative_adult is not None:
            out.extend((self._c_negative_adult, field, first, last, norm, tokens)
                       for first, last in ages.adults[:_HITS_PER_GROUP])
        if field in self._c_person_group.fields:
            base_parts = [i for i, f in flagged.items() if f & NAME_PART]
            base_typos = [i for i, f in flagged.items() if f & NAME_TYPO]
            for first, last, _ in self._persons.scan(tokens, self._c_ordinary, base_parts,
                                                     base_typos)[:_HITS_PER_GROUP]:
                out.append((self._c_person_group, field, first, last, norm, tokens))
        return out, ages.adults

    def _uncovered(self, tokens: Tokens, pairs: dict[str, list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """(first, last) words of "no clothes" / "clothes removed": a negation up to `window` words before
        a garment, or a removal right after it, with no comma or bracket in between."""
        window = self.rules.uncovered.window
        negation_ends = {last: first for first, last in pairs["negation"]}
        removal_starts = {first: last for first, last in pairs["removal"]}
        found = []
        for first, last in pairs["garment"]:
            hit = None
            for k in range(first - 1, max(-1, first - 1 - window), -1):
                if _barrier(tokens, k, first, allow=" -'"):
                    break
                if k in negation_ends:
                    hit = (negation_ends[k], last)
                    break
            for k in range(last + 1, last + 3):
                if hit is None and k in removal_starts and not _barrier(tokens, last, k, allow=" '"):  # not "off-white"
                    hit = (first, removal_starts[k])
            if hit is not None:
                found.append(hit)
        return found

    def _cancelled(self, group: _Group, tokens: Tokens, first: int, last: int) -> bool:
        """Context that says a hit is not what it seems ("college freshman", "baby elephant")."""
        canon, w = tokens.canon, group.near_window
        if group.except_near and not group.except_near.isdisjoint(
                canon[max(0, first - w):first] + canon[last + 1:last + w + 1]):
            return True
        for end in range(first - 1, max(-1, first - 1 - w), -1):
            for phrase in group.except_before_by_last.get(canon[end], ()):
                start = end - len(phrase) + 1
                if start >= 0 and tuple(canon[start:end + 1]) == phrase:
                    return True
        return False

    # -- verdict -------------------------------------------------------------------------------

    def audit(self, prompt: str, negative: str = "") -> Verdict:
        limit = self.rules.max_prompt_chars
        for field, text in (("prompt", prompt), ("negative", negative)):
            if len(text) > limit:
                return Verdict(
                    Action.block,
                    (Reason("prompt_too_long", f"{field} is {len(text)} characters; the limit is {limit}", field),),
                    tags=frozenset({"too_long"}),
                )
        hits: list[_Hit] = []
        adult_in_prompt = False
        for field, text in (("prompt", prompt), ("negative", negative)):
            if text:
                field_hits, adults = self._field_hits(field, text)
                hits.extend(field_hits)
                adult_in_prompt = adult_in_prompt or (field == "prompt" and bool(adults))
        flagged = []
        if self._c_classifier is not None and prompt:
            try:
                flagged = self._c_classifier.flagged(prompt)
            except Exception as exc:  # fail closed: a broken classifier refuses, it never allows
                raise SafetyError(f"text classifier failed: {exc}", code="text_classifier_failed") from exc
        if adult_in_prompt:  # an explicit adult age wins over a bare minor noun
            hits = [h for h in hits if not (h[0].weak and h[1] == "prompt")]
        if not hits and not flagged:
            return ALLOW
        hits.sort(key=lambda h: (FIELDS.index(h[1]), h[2], h[3], h[0].id))

        reasons: list[Reason] = []
        seen: set[tuple[str, str, int, int]] = set()
        per_rule: dict[str, int] = {}
        first_by_signal: dict[str, _Hit | Reason] = {}  # the evidence a combination cites
        action = Action.allow
        for hit in hits:
            group, field, first, last = hit[:4]
            key = (group.id, field, first, last)
            if key in seen:
                continue
            seen.add(key)
            for s in group.signals:
                first_by_signal.setdefault(s, hit)
            if group.quiet or per_rule.get(group.id, 0) >= MAX_REASONS_PER_RULE:
                continue
            per_rule[group.id] = per_rule.get(group.id, 0) + 1
            reasons.append(_reason(hit))
        for f in flagged:
            label = f.label
            reason = Reason(f"classifier.{label.name}", label.message or f"text classifier: {label.name} "
                            f"{f.probability:.2f}", "prompt", (0, len(prompt)), prompt)
            reasons.append(reason)
            for s in label.signals:
                first_by_signal.setdefault(s, reason)
            if label.action is not None:
                action = max(action, Action(label.action), key=lambda a: a.rank)
        signals = frozenset(first_by_signal)
        for group, *_ in hits:
            if group.action is not None and group.when <= signals:
                action = max(action, group.action, key=lambda a: a.rank)
        for combo in self.rules.combinations:
            if set(combo.all) <= signals and not signals.intersection(combo.unless):
                action = max(action, Action(combo.action), key=lambda a: a.rank)
                cue = first_by_signal[combo.all[0]]
                cue = cue if isinstance(cue, Reason) else _reason(cue)
                reasons.append(Reason(combo.id, combo.message, cue.field, cue.span, cue.matched))
        return Verdict(action, tuple(reasons), mature="mature" in signals, minor_signal="minor" in signals, tags=signals)

"""Prompt audit: rule lists from `configs/safety/prompt_audit.yaml` matched on normalised tokens.

How a verdict is reached:
- each term group marks a *signal* (`mature`, `minor`, `person`, `harm`, ...) and/or carries its own
  action (`block`, or `review` when the signals in `when` are present too);
- minor ages ("15yo", "fifteen-year-old", "aged 15") and young adjective + noun pairs ("little girl")
  mark `minor`; adult-body terms in the NEGATIVE prompt mark `minor` as well;
- `combinations` turn signals into actions (minor + mature -> block, person + mature -> block);
- benign phrases ("nude lipstick") hide their words from the other groups;
- a prompt or negative prompt longer than `max_prompt_chars` is blocked, never truncated.

Matching is token-based (hash lookups, a phrase table and an Aho-Corasick automaton for spaced-out
letters), so time is linear in the prompt length and a hostile 20,000-character prompt audits in
milliseconds. Every reason carries the span of the ORIGINAL text it matched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safety.errors import RulesInvalid
from safety.normalize import (
    Normalized,
    Tokens,
    has_long_repeat,
    normalize,
    shorten_repeats,
    squeeze,
    tokenize,
)
from safety.verdict import ALLOW, Action, Reason, Verdict

RULES_FILE = "prompt_audit.yaml"
FIELDS = ("prompt", "negative")
FieldName = Literal["prompt", "negative"]
MAX_REASONS_PER_RULE = 5  # evidence enough; a hostile prompt must not produce thousands of reasons


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
    signal: str | None = None
    action: Literal["block", "review"] | None = None
    when: list[str] = []
    fields: list[FieldName] = ["prompt"]
    terms: list[str] = []
    prefixes: list[str] = []

    _check_terms = field_validator("terms", "prefixes")(_words)

    @model_validator(mode="after")
    def _does_something(self) -> TermGroup:
        if not self.signal and not self.action:
            raise ValueError(f"group {self.id!r} needs a signal or an action")
        if not self.terms and not self.prefixes:
            raise ValueError(f"group {self.id!r} has no terms")
        return self


class YoungNounRule(_Rule):
    id: str
    message: str = ""
    window: int = Field(3, ge=1, le=10)
    adjectives: list[str]
    nouns: list[str] = []
    noun_prefixes: list[str] = []

    _check_terms = field_validator("adjectives", "nouns", "noun_prefixes")(_words)


class AgeRule(_Rule):
    id: str
    message: str = ""
    max_age: int = Field(17, ge=1, le=25)
    number_words: dict[str, int]
    years: list[str]  # need "old" after them when the age is a word ("ten years old")
    years_old: list[str]  # already mean "years old" ("yo")
    old: list[str]
    before: list[str]  # "aged 15", "age of 15"
    of: list[str] = ["of"]
    ordinals: list[str] = ["st", "nd", "rd", "th"]
    ordinal_nouns: list[str] = []  # "15th birthday", "5th grade"


class PersonNames(_Rule):
    id: str
    message: str = ""
    fields: list[FieldName] = ["prompt"]
    names: list[str] = []

    _check_terms = field_validator("names")(_words)


class Combination(_Rule):
    id: str
    message: str = ""
    all: list[str] = Field(min_length=2)
    action: Literal["block", "review"]


class PromptRules(_Rule):
    version: Literal[1] = 1
    max_prompt_chars: int = Field(20_000, ge=100)
    term_groups: list[TermGroup]
    benign_phrases: list[str] = []
    young_nouns: YoungNounRule
    ages: AgeRule
    person_names: PersonNames
    combinations: list[Combination] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> PromptRules:
        ids = [g.id for g in self.term_groups] + [self.young_nouns.id, self.ages.id, self.person_names.id]
        ids += [c.id for c in self.combinations]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate rule ids: {sorted(dupes)}")
        return self


def load_rules(rules_dir: Path) -> PromptRules:
    path = Path(rules_dir) / RULES_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return PromptRules.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise RulesInvalid(f"{path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Compiled matcher


def _phrase_tokens(text: str) -> tuple[str, ...]:
    """A rule term as the canonical tokens a prompt containing it would produce."""
    return tuple(tokenize(normalize(text)).canon)


@dataclass(frozen=True)
class _Group:
    """One compiled rule: what a hit means."""

    id: str
    message: str
    signal: str | None
    action: Action | None
    when: frozenset[str]
    fields: frozenset[str]
    role: Literal["term", "benign", "young_adj", "young_noun"] = "term"


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
_NOTHING: tuple = ((), ())  # lookup result of a word that matches nothing
_CACHE_LIMIT = 50_000


class _TermIndex:
    """Canonical token -> groups, phrases by first token, prefixes by length, and the run automaton."""

    def __init__(self, entries: Sequence[tuple[int, str, bool]]):
        single: dict[str, list[int]] = {}
        phrases: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        prefixes: dict[str, list[int]] = {}
        for group, term, is_prefix in entries:
            words = _phrase_tokens(term)
            if is_prefix:
                prefixes.setdefault("".join(words), []).append(group)
                continue
            single.setdefault("".join(words), []).append(group)  # also "taylorswift", "yearold"
            if len(words) > 1:
                phrases.setdefault(words[0], []).append((words[1:], group))
        self.single = {k: tuple(dict.fromkeys(v)) for k, v in single.items()}
        self.squeezed: dict[str, tuple[int, ...]] = {}
        for k, v in self.single.items():
            self.squeezed[squeeze(k)] = tuple(dict.fromkeys(self.squeezed.get(squeeze(k), ()) + v))
        self.phrases = {k: tuple(v) for k, v in phrases.items()}
        self.prefixes = {k: tuple(dict.fromkeys(v)) for k, v in prefixes.items()}
        self.prefix_lengths = sorted({len(k) for k in self.prefixes})
        self.runs = _AhoCorasick({**self.single, **self.prefixes})
        self._cache: dict[str, tuple[tuple[int, ...], tuple[tuple[tuple[str, ...], int], ...]]] = {}

    def lookup(self, canon: str) -> tuple[tuple[int, ...], tuple[tuple[tuple[str, ...], int], ...]]:
        """Groups matched by one token on its own, and phrases that may start with it."""
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
        phrases = self.phrases.get(canon, _EMPTY) + (self.phrases.get(stem, _EMPTY) if stem else _EMPTY)
        result = (tuple(dict.fromkeys(groups)), phrases) if groups or phrases else _NOTHING
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[canon] = result
        return result

    def scan(self, tokens: Tokens) -> list[tuple[int, int, int]]:
        """(group, first word, last word) of every term occurrence."""
        hits: list[tuple[int, int, int]] = []
        canon = tokens.canon
        n = len(canon)
        cache_get, lookup = self._cache.get, self.lookup
        found = [cache_get(w) or lookup(w) for w in canon]
        for i in [i for i, r in enumerate(found) if r is not _NOTHING]:
            groups, phrases = found[i]
            for g in groups:
                hits.append((g, i, i))
            for rest, g in phrases:
                end = i + len(rest)
                if end < n and _same(canon[i + 1], rest[0]) and all(_same(canon[i + 1 + k], w) for k, w in enumerate(rest)):
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
        return hits


def _same(token: str, word: str) -> bool:
    return token == word or (len(token) > 3 and token[-1] == "s" and token[:-1] == word)


class _AgeMatcher:
    """Ages up to `max_age` written as a template: "15 years old", "15yo", "aged 15", "15th birthday"."""

    def __init__(self, rule: AgeRule):
        def canon_set(words: Iterable[str]) -> frozenset[str]:
            return frozenset("".join(_phrase_tokens(w)) for w in words)

        self.max_age = rule.max_age
        self.words = {"".join(_phrase_tokens(w)): v for w, v in rule.number_words.items()}
        self.years = canon_set(rule.years)
        self.years_old = canon_set(rule.years_old)
        self.old = canon_set(rule.old)
        self.before = canon_set(rule.before)
        self.of = canon_set(rule.of)
        self.ordinals = canon_set(rule.ordinals)
        self.ordinal_nouns = canon_set(rule.ordinal_nouns)
        self.cues_after = self.years | self.years_old | self.ordinals
        self.cues_before = self.before | self.of

    def scan(self, tokens: Tokens) -> list[tuple[int, int]]:
        """(first, last) word indexes of every minor age."""
        canon, numbers, words = tokens.canon, tokens.numbers, self.words
        ages = {i: a for i, a in numbers.items() if 0 < a <= self.max_age}
        ages.update((i, words[w]) for i, w in enumerate(canon) if w in words and 0 < words[w] <= self.max_age)
        found: list[tuple[int, int]] = []
        n, weights = len(canon), tokens.weights
        for i in sorted(ages):
            if not weights and (i + 1 >= n or canon[i + 1] not in self.cues_after) and (
                    i == 0 or canon[i - 1] not in self.cues_before):
                continue  # the common case, decided without looking further
            nxt, after = _neighbours(tokens, i, +1)
            prev, before = _neighbours(tokens, i, -1)
            if _at(canon, nxt) in self.years_old:
                found.append((i, nxt))
            elif _at(canon, nxt) in self.years and _at(canon, after) in self.old:
                found.append((i, after))
            elif _at(canon, nxt) in self.years and i in numbers:  # "15 years", but not "one year later"
                found.append((i, nxt))
            elif _at(canon, nxt) in self.ordinals and _at(canon, after) in self.ordinal_nouns:
                found.append((i, after))
            elif _at(canon, prev) in self.before:
                found.append((prev, i))
            elif _at(canon, prev) in self.of and _at(canon, before) in self.before:
                found.append((before, i))
        return found


def _at(canon: list[str], j: int | None) -> str:
    return canon[j] if j is not None else ""


def _neighbours(tokens: Tokens, i: int, step: int) -> tuple[int | None, int | None]:
    """The next two words from i in direction `step`, looking past attention weights
    ("(15:1.0) yo" reads as "15 yo"); a weight has at most two digit words, so the search is bounded."""
    out: list[int] = []
    j, n = i + step, len(tokens.canon)
    while 0 <= j < n and len(out) < 2 and abs(j - i) <= 6:
        if j not in tokens.weights:
            out.append(j)
        j += step
    out += [None] * (2 - len(out))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# The auditor


class PromptAuditor:
    """Audits a prompt and its negative prompt; deterministic and linear in the text length.

    Real-person names come from the rules file and, at run time, from takedowns:
    `auditor.with_person_names(names)` returns an auditor whose matcher includes them.
    """

    def __init__(self, rules: PromptRules, extra_person_names: Iterable[str] = ()):
        self.rules = rules
        self.extra_person_names = tuple(dict.fromkeys(n for n in extra_person_names if _phrase_tokens(n)))
        groups: list[_Group] = []
        entries: list[tuple[int, str, bool]] = []

        def add(group: _Group, terms: Iterable[str], prefixes: Iterable[str] = ()) -> None:
            groups.append(group)
            idx = len(groups) - 1
            entries.extend((idx, t, False) for t in terms)
            entries.extend((idx, p, True) for p in prefixes)

        for g in rules.term_groups:
            add(
                _Group(g.id, g.message, g.signal, Action(g.action) if g.action else None, frozenset(g.when), frozenset(g.fields)),
                g.terms,
                g.prefixes,
            )
        yn = rules.young_nouns
        add(_Group(yn.id, yn.message, None, None, frozenset(), frozenset(FIELDS), "young_adj"), yn.adjectives)
        add(_Group(yn.id, yn.message, None, None, frozenset(), frozenset(FIELDS), "young_noun"), yn.nouns, yn.noun_prefixes)
        pn = rules.person_names
        add(_Group(pn.id, pn.message, "person", None, frozenset(), frozenset(pn.fields)), (*pn.names, *self.extra_person_names))
        add(_Group("benign", "", None, None, frozenset(), frozenset(FIELDS), "benign"), rules.benign_phrases)
        self._groups = groups
        self._young = _Group(yn.id, yn.message or "young person", "minor", None, frozenset(), frozenset({"prompt"}))
        self._age_group = _Group(rules.ages.id, rules.ages.message or "minor age", "minor", None, frozenset(), frozenset({"prompt"}))
        self._index = _TermIndex(entries)
        self._ages = _AgeMatcher(rules.ages)

    @classmethod
    def from_dir(cls, rules_dir: Path, extra_person_names: Iterable[str] = ()) -> PromptAuditor:
        return cls(load_rules(rules_dir), extra_person_names)

    def with_person_names(self, names: Iterable[str]) -> PromptAuditor:
        """A new auditor that also knows `names` (e.g. from takedowns); this one is unchanged."""
        return PromptAuditor(self.rules, (*self.extra_person_names, *names))

    # -- matching ------------------------------------------------------------------------------

    def _field_hits(self, field: str, text: str) -> list[tuple[_Group, str, int, int, Normalized, Tokens]]:
        """(group, field, first word, last word, text, words) of every rule that fired in one field."""
        norm = normalize(text)
        tokens = tokenize(norm)
        if not tokens.canon:
            return []
        groups = self._groups
        raw = self._index.scan(tokens)
        covered: set[int] = set()
        for g, first, last in raw:
            if groups[g].role == "benign":
                covered.update(range(first, last + 1))
        out = []
        adjectives: set[int] = set()
        nouns: list[tuple[int, int]] = []
        for g, first, last in raw:
            group = groups[g]
            if group.role == "benign" or first in covered or field not in group.fields:
                continue
            if group.role == "young_adj":
                adjectives.add(last)
            elif group.role == "young_noun":
                nouns.append((first, last))
            else:
                out.append((group, field, first, last, norm, tokens))
        if field in self._young.fields and adjectives:
            window = self.rules.young_nouns.window
            for first, last in nouns:
                adj = next((first - k for k in range(1, window + 1) if first - k in adjectives), None)
                if adj is not None:
                    out.append((self._young, field, adj, last, norm, tokens))
        if field in self._age_group.fields:
            out.extend((self._age_group, field, first, last, norm, tokens) for first, last in self._ages.scan(tokens))
        return out

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
        hits = []
        for field, text in (("prompt", prompt), ("negative", negative)):
            if text:
                hits.extend(self._field_hits(field, text))
        if not hits:
            return ALLOW
        hits.sort(key=lambda h: (FIELDS.index(h[1]), h[2], h[3], h[0].id))

        reasons: list[Reason] = []
        seen: set[tuple[str, str, int, int]] = set()
        per_rule: dict[str, int] = {}
        first_by_signal: dict[str, Reason] = {}
        action = Action.allow
        for group, field, first, last, norm, tokens in hits:
            key = (group.id, field, first, last)
            if key in seen:
                continue
            seen.add(key)
            per_rule[group.id] = per_rule.get(group.id, 0) + 1
            if per_rule[group.id] > MAX_REASONS_PER_RULE and (not group.signal or group.signal in first_by_signal):
                continue
            start, end = norm.span(tokens.span(first)[0], tokens.span(last)[1])
            reason = Reason(group.id, group.message, field, (start, end), norm.source[start:end])
            reasons.append(reason)
            if group.signal:
                first_by_signal.setdefault(group.signal, reason)
        signals = frozenset(first_by_signal)
        for group, *_ in hits:
            if group.action is not None and group.when <= signals:
                action = max(action, group.action, key=lambda a: a.rank)
        for combo in self.rules.combinations:
            if set(combo.all) <= signals:
                action = max(action, Action(combo.action), key=lambda a: a.rank)
                cue = first_by_signal[combo.all[0]]
                reasons.append(Reason(combo.id, combo.message, cue.field, cue.span, cue.matched))
        return Verdict(action, tuple(reasons), mature="mature" in signals, minor_signal="minor" in signals, tags=signals)

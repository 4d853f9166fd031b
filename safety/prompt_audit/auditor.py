"""`PromptAuditor`: the audit itself, over the compiled rules; every reason keeps its rule id and span."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from safety.errors import RulesInvalid, SafetyError
from safety.normalize import normalize
from safety.persons import PersonIndex, load_names
from safety.prompt_audit.ages import _AgeMatcher, _barrier
from safety.prompt_audit.matcher import (
    AGE_CUE,
    NAME_FUZZY,
    NAME_PART,
    NAME_TYPO,
    NUMBER_WORD,
    _Group,
    _TermIndex,
)
from safety.prompt_audit.rules import (
    _HITS_PER_GROUP,
    FIELDS,
    MAX_REASONS_PER_RULE,
    PromptRules,
    _canon_set,
    _phrase_tokens,
    load_rules,
)
from safety.text_classifier import TextClassifier
from safety.tokens import Tokens, tokenize
from safety.verdict import ALLOW, Action, Reason, Verdict
from safety.wordlist import ordinary_words

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
        self._c_roles = [g.role for g in groups]
        self._c_counts = {f: [g.role != "benign" and f in g.fields for g in groups] for f in FIELDS}
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
        self._c_index = _TermIndex(entries, flags, lambda w: (NAME_TYPO if base_persons.may_be_typo(w, ordinary) else 0)
                                   | (NAME_FUZZY if base_persons.near_parts(w, ordinary) else 0))
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
        # per group: its role, and whether it counts in this field (benign phrases only cover words)
        roles, counts = self._c_roles, self._c_counts[field]
        covered: set[int] = set()
        for g, spans in raw.items():
            if roles[g] == "benign":
                for first, last in spans:
                    covered.update(range(first, last + 1))
        adjectives: set[int] = set()
        nouns: list[tuple[int, int]] = []
        pairs: dict[str, list[tuple[int, int]]] = {"negation": [], "garment": [], "removal": []}
        by_group: dict[int, list[tuple[int, int]]] = {}
        for g, spans in raw.items():
            if not counts[g]:
                continue
            if covered:
                spans = [span for span in spans if span[0] not in covered]
            role = roles[g]
            if role == "young_adj":
                adjectives.update(last for _, last in spans)
            elif role == "young_noun":
                nouns.extend(spans)
            elif role in pairs:
                pairs[role].extend(spans)
            else:
                group = groups[g]
                # Enough evidence per rule: a hostile prompt repeating a word must not cost a context
                # check per repetition. Cancelled hits do not count towards the cap.
                if group.cancellable:
                    spans = (span for span in spans if not self._cancelled(group, tokens, *span))
                kept = by_group[g] = list(islice(spans, _HITS_PER_GROUP))
                if not kept:
                    del by_group[g]
        out: list[_Hit] = []
        for g, spans in by_group.items():
            group = groups[g]
            if group.min_hits > 1 and len({"".join(tokens.canon[a:b + 1]) for a, b in spans}) < group.min_hits:
                continue
            out.extend((group, field, first, last, norm, tokens) for first, last in spans)
        if field in self._c_young.fields and adjectives:
            window = self.rules.young_nouns.window
            young = 0
            # in text order (the one the reasons are sorted in), each noun once, so the first ones kept
            # are the ones a verdict would show
            for first, last in sorted(set(nouns)):
                adj = next((first - k for k in range(1, window + 1) if first - k in adjectives), None)
                if adj is not None:
                    out.append((self._c_young, field, adj, last, norm, tokens))
                    young += 1
                    if young >= _HITS_PER_GROUP:
                        break
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
            base_parts = flagged.at(NAME_PART)
            base_typos = flagged.at(NAME_TYPO)
            for first, last, _ in self._persons.scan(tokens, self._c_ordinary, base_parts, base_typos,
                                                     limit=_HITS_PER_GROUP, base_fuzzy=flagged.at(NAME_FUZZY)):
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


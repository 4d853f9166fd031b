"""The prompt audit's rule files: their typed schema (pydantic) and loading with the lexicons."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safety.errors import RulesInvalid
from safety.normalize import normalize
from safety.text_classifier import ClassifierConfig
from safety.tokens import tokenize

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
    aged_with: list[str] = []  # a person noun, this word, a bare number: "Mädchen mit 13", "girl of 12,"
    animal_groups: list[str] = []  # groups naming animals: "a cat, 15 years old" is the animal's age
    negative_adult_group: str | None = None  # group whose minor signal an adult age in the negative gives

    _check_terms = field_validator(
        "years", "years_old", "old", "before", "of", "ordinals", "ordinal_nouns", "grade_nouns", "not_after",
        "not_before", "turned", "approx", "person_nouns", "copulas", "birth", "birth_joiners", "birth_after",
        "class_of", "aged_with")(_words)


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


def _phrase_tokens(text: str) -> tuple[str, ...]:
    """A rule term as the canonical tokens a prompt containing it would produce."""
    return tuple(tokenize(normalize(text)).canon)


def _canon_set(words: Iterable[str]) -> frozenset[str]:
    return frozenset("".join(_phrase_tokens(w)) for w in words)

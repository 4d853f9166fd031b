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

from safety.prompt_audit.auditor import PromptAuditor
from safety.prompt_audit.rules import RULES_FILE, PromptRules, load_rules

__all__ = ["RULES_FILE", "PromptAuditor", "PromptRules", "load_rules"]

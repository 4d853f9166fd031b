"""Verdicts: what every safety check returns. Machine-readable rule ids, never only text."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class Action(str, enum.Enum):
    allow = "allow"
    review = "review"
    block = "block"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Action.allow: 0, Action.review: 1, Action.block: 2}


@dataclass(frozen=True)
class Reason:
    """One rule that fired. `span` indexes the original text of `field` (prompt / negative / ...)."""

    rule_id: str
    message: str = ""
    field: str | None = None
    span: tuple[int, int] | None = None
    matched: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in (("rule_id", self.rule_id), ("message", self.message), ("field", self.field),
                                  ("span", list(self.span) if self.span else None), ("matched", self.matched)) if v}


@dataclass(frozen=True)
class Verdict:
    action: Action
    reasons: tuple[Reason, ...] = ()
    # Facts later stages need: a mature prompt turns on the minor-protection embedding;
    # a minor signal makes any mature image a block.
    mature: bool = False
    minor_signal: bool = False
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def rule_ids(self) -> list[str]:
        return [r.rule_id for r in self.reasons]

    @property
    def blocked(self) -> bool:
        return self.action is Action.block

    def to_dict(self) -> dict:
        return {
            "action": self.action.value,
            "rules": self.rule_ids,
            "reasons": [r.to_dict() for r in self.reasons],
            "mature": self.mature,
            "minor_signal": self.minor_signal,
        }

    @staticmethod
    def combine(verdicts: Iterable[Verdict]) -> Verdict:
        """The strictest action wins; reasons and signals accumulate."""
        vs = list(verdicts)
        if not vs:
            return Verdict(Action.allow)
        action = max((v.action for v in vs), key=lambda a: a.rank)
        return Verdict(
            action=action,
            reasons=tuple(r for v in vs for r in v.reasons),
            mature=any(v.mature for v in vs),
            minor_signal=any(v.minor_signal for v in vs),
            tags=frozenset().union(*(v.tags for v in vs)),
        )


ALLOW = Verdict(Action.allow)

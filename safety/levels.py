"""Content levels: Civitai's browsing levels, the one type the API, the worker wire and the policy share.

On the wire (HTTP JSON, the worker's stream, the job row) a level is its lower-case name (`"pg13"`),
written by `to_wire` and read by `from_wire`; in code it is this IntEnum, ordered, so `a > b` and
`min(...)` compare levels. The bit values are kept so levels can be OR-ed into level sets.
"""

from __future__ import annotations

import enum


class NsfwLevel(enum.IntEnum):
    PG = 1
    PG13 = 2
    R = 4
    X = 8

    @classmethod
    def parse(cls, value: str | int | NsfwLevel) -> NsfwLevel:
        """A level from its name in any case ("x", "PG-13"), its bit value, or a level."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        key = str(value).strip().upper().replace("-", "")
        try:
            return cls[key]
        except KeyError:
            raise ValueError(f"unknown NSFW level {value!r}; use one of {[lvl.to_wire() for lvl in cls]}") from None

    @classmethod
    def from_wire(cls, value: str) -> NsfwLevel:
        """A level as the API and the worker wire name it."""
        if not isinstance(value, str):
            raise ValueError(f"an NSFW level is named by a string, not {type(value).__name__}")
        return cls.parse(value)

    def to_wire(self) -> str:
        return self.name.lower()

    @classmethod
    def lowest(cls, *levels: NsfwLevel | None) -> NsfwLevel:
        """The most restrictive of `levels` (PG13 when none is given)."""
        present = [lv for lv in levels if lv is not None]
        return min(present) if present else cls.PG13

    @property
    def mature(self) -> bool:
        return self >= NsfwLevel.R

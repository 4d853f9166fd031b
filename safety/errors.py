"""Safety's own typed errors (the service maps them to its HTTP codes once)."""

from __future__ import annotations


class SafetyError(Exception):
    """A safety component could not do its job. Callers must fail closed."""

    code = "safety_error"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class RulesInvalid(SafetyError):
    code = "safety_rules_invalid"


class EmbeddingUnavailable(SafetyError):
    code = "safety_embedding_unavailable"


class NotSafetensors(SafetyError):
    code = "not_safetensors"

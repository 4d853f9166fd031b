"""The v1 request schema: bounds, forbidden fields, and the tier limits file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from genserve.core.errors import ConfigError, InvalidRequest
from genserve.generation.protocol import (
    DEFAULT_TIERS,
    GenerationRequest,
    Limits,
    NsfwLevel,
    Priority,
    Sampler,
)

BASE = {"prompt": "a red fox", "checkpoint": "tiny-sd1"}


def _errors(body: dict) -> dict[tuple, str]:
    with pytest.raises(ValidationError) as info:
        GenerationRequest.model_validate(body)
    return {tuple(e["loc"]): e["type"] for e in info.value.errors()}


def test_defaults_and_required_samplers():
    req = GenerationRequest.model_validate(BASE)
    assert req.seed is None and req.quantity == 1 and req.priority is Priority.normal
    assert req.resources == [] and req.hires is None and req.version == 1
    names = {s.value for s in Sampler}
    assert {"Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LCM"} <= names


def test_prompt_embeds_and_unknown_fields_are_refused():
    errors = _errors({**BASE, "prompt_embeds": [[0.1, 0.2]]})
    assert errors == {("prompt_embeds",): "extra_forbidden"}
    assert _errors({**BASE, "hires": {"scale": 1.5, "safety": False}}) == {("hires", "safety"): "extra_forbidden"}
    assert _errors({**BASE, "resources": [{"id": "x", "token": "<gs-safe-neg>"}]}) == {
        ("resources", 0, "token"): "extra_forbidden"
    }


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"prompt": ""}, ("prompt",)),
        ({"prompt": "x" * 4001}, ("prompt",)),
        ({"steps": 0}, ("steps",)),
        ({"cfg_scale": 31}, ("cfg_scale",)),
        ({"seed": -2}, ("seed",)),  # -1 is A1111's "random"
        ({"seed": 2**32}, ("seed",)),
        ({"quantity": 21}, ("quantity",)),
        ({"sampler": "Euler b"}, ("sampler",)),
        ({"resources": [{"id": "l", "strength": 2.5}]}, ("resources", 0, "strength")),
        ({"resources": [{"id": "l", "strength": -1.5}]}, ("resources", 0, "strength")),
        ({"resources": [{"id": f"r{i}"} for i in range(13)]}, ("resources",)),
        ({"resources": [{"id": "a"}, {"id": "a"}]}, ("resources",)),
        ({"hires": {"denoise": 0.9}}, ("hires", "denoise")),
        ({"idempotency_key": "has space"}, ("idempotency_key",)),
        ({"nsfw_level": "extreme"}, ("nsfw_level",)),
        ({"priority": "urgent"}, ("priority",)),
    ],
)
def test_out_of_bounds_fields_name_the_field(patch, loc):
    assert loc in _errors({**BASE, **patch})


def test_width_and_height_go_together():
    assert ("width",) not in _errors({**BASE, "width": 64})  # a model-level error, not a field one
    GenerationRequest.model_validate({**BASE, "width": 64, "height": 96})


def test_lora_strength_range_is_inclusive():
    req = GenerationRequest.model_validate({**BASE, "resources": [{"id": "a", "strength": -1}, {"id": "b", "strength": 2}]})
    assert [r.strength for r in req.resources] == [-1.0, 2.0]


def test_fingerprint_ignores_only_the_idempotency_key():
    a = GenerationRequest.model_validate({**BASE, "idempotency_key": "k1"})
    b = GenerationRequest.model_validate({**BASE, "idempotency_key": "k2"})
    c = GenerationRequest.model_validate({**BASE, "idempotency_key": "k1", "steps": 21})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_nsfw_level_lowest_wins():
    assert NsfwLevel.lowest(NsfwLevel.X, NsfwLevel.R) is NsfwLevel.R
    assert NsfwLevel.lowest(None, NsfwLevel.X) is NsfwLevel.X
    assert NsfwLevel.lowest(None) is NsfwLevel.PG13


def test_limits_file_in_repository_matches_defaults():
    limits = Limits.load(Path(__file__).resolve().parents[1] / "configs" / "limits.yaml")
    assert limits.tiers == DEFAULT_TIERS
    assert limits.tier(None) == DEFAULT_TIERS["free"]
    assert limits.tier("gold").quantity == 12
    with pytest.raises(InvalidRequest) as info:
        limits.tier("platinum")
    assert info.value.code == "unknown_tier"


def test_priority_admission_refuses_low_first():
    limits = Limits(max_active_jobs=10)
    assert limits.admits(Priority.low, 6) and not limits.admits(Priority.low, 7)
    assert limits.admits(Priority.normal, 8) and not limits.admits(Priority.normal, 9)
    assert limits.admits(Priority.high, 9) and not limits.admits(Priority.high, 10)


def test_invalid_limits_file_is_a_config_error(tmp_path):
    bad = tmp_path / "limits.yaml"
    bad.write_text("default_tier: vip\n")
    with pytest.raises(ConfigError) as info:
        Limits.load(bad)
    assert info.value.code == "limits_invalid"
    assert Limits.load(tmp_path / "missing.yaml").default_tier == "free"

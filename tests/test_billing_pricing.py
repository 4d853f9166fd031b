"""Pricing: integers only, itemised, Civitai's reference points, monotonic, and exact delivered amounts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.billing.pricing import HiresParams, Pricing, Quote
from genserve.core.errors import ConfigError, InvalidRequest

PRICING = Path(__file__).resolve().parents[1] / "configs" / "pricing.yaml"
pricing = Pricing.load(PRICING)

sizes = st.integers(min_value=8, max_value=2048)
steps_st = st.integers(min_value=1, max_value=150)
qty_st = st.integers(min_value=1, max_value=16)
extra_st = st.integers(min_value=0, max_value=8)
family_st = st.sampled_from(["sd1", "sdxl"])


def _assert_well_formed(q: Quote) -> None:
    assert isinstance(q.total, int) and isinstance(q.per_image, int)
    assert q.total == q.per_image * q.quantity
    assert sum(item.amount for item in q.items) == q.total
    assert all(isinstance(item.amount, int) and item.amount >= 0 for item in q.items)
    assert q.per_image >= 1


def test_reference_points():
    assert pricing.quote_generation("sd1", 512, 512, 30, 1).total == 1
    assert pricing.quote_generation("sd1", 512, 512, 30, 4).total == 4
    assert pricing.quote_generation("sdxl", 1024, 1024, 30, 1).total == 4
    assert pricing.quote_generation("sd1", 512, 512, 60, 1).total == 2
    assert pricing.quote_training("sd1", 1000, 10).total == 200 + 100
    assert pricing.quote_training("sdxl", 2000, 5).total == 400 + 50
    assert pricing.quote_training("flux", 1000, 10).total == 900 + 200


def test_tiny_images_cost_at_least_the_minimum():
    q = pricing.quote_generation("sd1", 64, 64, 2, 3)
    assert q.per_image == 1 and q.total == 3
    _assert_well_formed(q)
    assert [i.name for i in q.items] == ["image", "rounding"]


def test_quote_is_itemised():
    q = pricing.quote_generation(
        "sdxl", 1024, 1024, 30, 2, extra_resources=2, hires=HiresParams.upscaled(1024, 1024, 1.5, 10)
    )
    names = [i.name for i in q.items]
    assert names[:3] == ["image", "hires_fix", "extra_resources"]
    assert q.items[0].amount == 8 and q.items[1].millibuzz == 2 * 3000 and q.items[2].millibuzz == 2 * 500
    _assert_well_formed(q)
    assert q.to_dict()["total"] == q.total
    t = pricing.quote_training("sd1", 999, 3)
    assert [i.name for i in t.items] == ["steps", "saved_epochs"]
    assert sum(i.amount for i in t.items) == t.total == 200 + 30


@settings(max_examples=200, deadline=None)
@given(family_st, sizes, sizes, steps_st, qty_st, extra_st)
def test_quote_monotonic_and_integer(family, w, h, steps, qty, extra):
    q = pricing.quote_generation(family, w, h, steps, qty, extra)
    _assert_well_formed(q)
    assert pricing.quote_generation(family, w + 8, h, steps, qty, extra).total >= q.total
    assert pricing.quote_generation(family, w, h + 8, steps, qty, extra).total >= q.total
    assert pricing.quote_generation(family, w, h, steps + 1, qty, extra).total >= q.total
    assert pricing.quote_generation(family, w, h, steps, qty + 1, extra).total > q.total
    assert pricing.quote_generation(family, w, h, steps, qty, extra + 1).total >= q.total
    hires = pricing.quote_generation(family, w, h, steps, qty, extra, HiresParams(w * 2, h * 2, 5))
    assert hires.total >= q.total
    _assert_well_formed(hires)


@settings(max_examples=200, deadline=None)
@given(family_st, sizes, sizes, steps_st, qty_st, extra_st)
def test_for_delivered_never_exceeds_total(family, w, h, steps, qty, extra):
    q = pricing.quote_generation(family, w, h, steps, qty, extra)
    amounts = [q.for_delivered(k) for k in range(qty + 1)]
    assert amounts[0] == 0 and amounts[-1] == q.total
    assert amounts == sorted(amounts) and all(a <= q.total for a in amounts)
    assert q.for_delivered(qty + 5) == q.total


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["sd1", "sdxl", "flux"]), st.integers(1, 20000), st.integers(0, 50))
def test_training_progress_never_exceeds_total(family, steps, epochs):
    t = pricing.quote_training(family, steps, epochs)
    assert isinstance(t.total, int) and t.total == sum(i.amount for i in t.items)
    assert t.for_progress(steps, epochs) == t.total
    assert t.for_progress(0, 0) == 0
    half = t.for_progress(steps // 2, epochs // 2)
    assert 0 <= half <= t.total
    assert t.for_progress(steps * 2, epochs + 3) == t.total
    assert pricing.quote_training(family, steps + 1, epochs).total >= t.total


@pytest.mark.parametrize(
    "kwargs",
    [
        {"family": "sd3"},
        {"width": 0},
        {"height": -8},
        {"steps": 0},
        {"quantity": 0},
        {"width": 512.0},
        {"steps": True},
        {"extra_resources": -1},
        {"hires": HiresParams(0, 512, 10)},
    ],
)
def test_bad_quote_input_is_refused(kwargs):
    args = {"family": "sd1", "width": 512, "height": 512, "steps": 30, "quantity": 1, **kwargs}
    with pytest.raises(InvalidRequest) as exc:
        pricing.quote_generation(**args)
    assert exc.value.code in {"unknown_family", "invalid_quote_input"}


def test_bad_delivered_counts_are_refused():
    q = pricing.quote_generation("sd1", 512, 512, 30, 2)
    for bad in (-1, 1.0, True):
        with pytest.raises(InvalidRequest):
            q.for_delivered(bad)
    t = pricing.quote_training("sd1", 100, 2)
    with pytest.raises(InvalidRequest):
        t.for_progress(-1, 0)
    with pytest.raises(InvalidRequest):
        pricing.quote_training("sd1", 0, 1)


def test_price_list_must_be_integers(tmp_path):
    bad = PRICING.read_text().replace("base_millibuzz: 1000", "base_millibuzz: 1.5")
    (tmp_path / "pricing.yaml").write_text(bad)
    with pytest.raises(ConfigError) as exc:
        Pricing.load(tmp_path / "pricing.yaml")
    assert exc.value.code == "pricing_invalid"


def test_from_settings_reads_configured_file(settings):
    assert Pricing.from_settings(settings).quote_generation("sd1", 512, 512, 30, 1).total == 1


def test_a_face_fix_refund_comes_out_of_the_platforms_leg_and_the_legs_still_sum_to_the_capture():
    from dataclasses import replace


    quote = Quote(family="sd1", quantity=4, per_image=30, total=120, items=(), face_fix_passes=2,
                  face_pass_millibuzz=4500, min_per_image=1)
    legs = (("revenue:generation", 20, "capture"), ("user:owner", 7, "licence_fee"),
            ("revenue:generation", 3, "platform_share"))
    quote = replace(quote, legs_per_image=legs)
    assert quote.for_delivered(3) == 90  # no face counts given: the held price
    assert quote.face_fix_refund(3, 6) == 0  # every pass ran
    assert quote.face_fix_refund(3, 2) == 4 * 4500 // 1000  # four passes not run, rounded down
    assert quote.face_fix_refund(3, 99) == 0
    assert quote.for_delivered(3, 2) == 90 - 18
    split = quote.legs_for_delivered(3, 2)
    assert sum(amount for _, amount, _ in split) == quote.for_delivered(3, 2)
    assert split[1:] == [("user:owner", 21, "licence_fee"), ("revenue:generation", 9, "platform_share")]
    # never under the price list's minimum per image
    cheap = Quote(family="sd1", quantity=1, per_image=2, total=2, items=(), face_fix_passes=4,
                  face_pass_millibuzz=900, min_per_image=1)
    assert cheap.for_delivered(1, 0) == 1

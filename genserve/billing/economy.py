"""Creator economy pricing: licence fees, tips and the priority fee on top of a generation's base price.

Every extra is priced per image, like the base, so a capture for the images actually delivered pays
each party exactly its per-image share times the delivered count, and a withheld or failed image
pays nobody. Per delivered image:

- base: the price list's per-image cost, to `revenue:generation` (leg kind `capture`);
- licence fee: each used resource's owner-set fee (whole buzz, 0..`licence_fee_cap`), to its owner;
- creator tip: ceil(base x pct / 100), pct in steps of `tip_step_pct` (0..100). It is split equally
  between the distinct owners of the request's resources (checkpoint first, then LoRAs, then
  embeddings, in request order); the remainder of the division goes one buzz each to the first
  owners in that order. With no owner to tip, the creator tip is 0;
- platform tip: ceil(base x pct / 100), to `revenue:generation`;
- priority fee: the configured buzz per image for the request's priority, to `revenue:generation`;
- platform share: `platform_share_pct` of each owner's licence fee and tip leg, rounded down, goes
  to `revenue:generation` (kind `platform_share`); the owner keeps the rest.

Fees and tips are never paid to the payer themselves (a user's own resource costs no fee and takes
no tip). All arithmetic is on integers, and the legs sum to the per-image price by construction.

A training run pays its base model's owner the same licence fee once, for the one LoRA it delivers
(`price_training`): the fee is added to the quote and the hold, and captured only when the run
succeeds; a canceled or failed run pays the owner nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from genserve.billing.accounts import REVENUE_GENERATION, REVENUE_TRAINING, user_account
from genserve.billing.pricing import MILLI, Quote, QuoteItem, TrainingQuote
from genserve.core.config.billing import EconomyConfig
from genserve.core.errors import InvalidRequest

Leg = tuple[str, int, str]


@dataclass(frozen=True)
class CreatorTerms:
    """What using one resource owes its owner per image."""

    resource_id: str
    owner_user_id: str | None
    licence_fee: int = 0


def ceil_pct(amount: int, pct: int) -> int:
    return -(-amount * pct // 100)


def check_tip(name: str, pct: object, config: EconomyConfig) -> int:
    if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100 or pct % config.tip_step_pct:
        raise InvalidRequest(f"{name} must be a whole percentage 0..100 in steps of {config.tip_step_pct}",
                             code="invalid_tip", details={name: pct})
    return pct


def split_owner_income(owner: str, amount: int, kind: str, config: EconomyConfig,
                       platform: str = REVENUE_GENERATION) -> list[Leg]:
    """An owner's income leg and the platform's share of it (rounded down, in the owner's favour)."""
    share = amount * config.platform_share_pct // 100
    return [(user_account(owner), amount - share, kind), (platform, share, "platform_share")]


def price_generation(quote: Quote, *, payer: str, terms: Sequence[CreatorTerms], config: EconomyConfig,
                     creator_tip_pct: int = 0, platform_tip_pct: int = 0, priority: str = "normal",
                     platform: str = REVENUE_GENERATION) -> Quote:
    """`quote` (the base price) with licence fees, tips and the priority fee added, and its legs."""
    creator_tip_pct = check_tip("creator_tip_pct", creator_tip_pct, config)
    platform_tip_pct = check_tip("platform_tip_pct", platform_tip_pct, config)
    base, q = quote.per_image, quote.quantity
    legs: list[Leg] = [(platform, base, "capture")]
    items = list(quote.items)

    for t in terms:
        fee = min(t.licence_fee, config.licence_fee_cap)
        if not fee or t.owner_user_id is None or t.owner_user_id == payer:
            continue
        legs += split_owner_income(t.owner_user_id, fee, "licence_fee", config, platform)
        items.append(QuoteItem(f"licence_fee:{t.resource_id}", fee * q,
                               f"licence fee of {t.resource_id} (owner {t.owner_user_id}): {fee}/image x {q}"))

    owners = list(dict.fromkeys(t.owner_user_id for t in terms if t.owner_user_id and t.owner_user_id != payer))
    tip = ceil_pct(base, creator_tip_pct) if owners else 0
    if tip:
        each, rest = divmod(tip, len(owners))
        for i, owner in enumerate(owners):
            legs += split_owner_income(owner, each + (1 if i < rest else 0), "creator_tip", config, platform)
    if creator_tip_pct:
        to = ", ".join(owners) if owners else "no owner to tip: nothing charged"
        items.append(QuoteItem("creator_tip", tip * q,
                               f"{creator_tip_pct}% of {base} base/image, rounded up = {tip}/image x {q}; split "
                               f"equally, remainder to the first: {to}"))

    platform_tip = ceil_pct(base, platform_tip_pct)
    if platform_tip:
        legs.append((platform, platform_tip, "platform_tip"))
        items.append(QuoteItem("platform_tip", platform_tip * q,
                               f"{platform_tip_pct}% of {base} base/image, rounded up = {platform_tip}/image x {q}"))

    priority_fee = config.priority_fee_per_image.get(priority, 0)
    if priority_fee:
        legs.append((platform, priority_fee, "priority_fee"))
        items.append(QuoteItem("priority", priority_fee * q, f"{priority} priority: {priority_fee}/image x {q}"))

    legs = [leg for leg in legs if leg[1]]
    per_image = sum(amount for _, amount, _ in legs)
    plain = len(legs) == 1 and legs[0][2] == "capture"  # nothing but the base: a plain capture
    return replace(quote, per_image=per_image, total=per_image * q, items=tuple(items),
                   legs_per_image=() if plain else tuple(legs))


def price_training(quote: TrainingQuote, *, payer: str, base: CreatorTerms | None, config: EconomyConfig,
                   platform: str = REVENUE_TRAINING) -> TrainingQuote:
    """`quote` with the base model owner's licence fee (capped like a generation's) added once: a run
    delivers one LoRA, as a generation delivers images. No owner, no fee, or the payer's own base
    model: the quote unchanged."""
    if base is None or base.owner_user_id is None or base.owner_user_id == payer:
        return quote
    fee = min(base.licence_fee, config.licence_fee_cap)
    if not fee:
        return quote
    owner, rid = base.owner_user_id, base.resource_id
    legs = tuple(leg for leg in split_owner_income(owner, fee, "licence_fee", config, platform) if leg[1])
    item = QuoteItem(f"licence_fee:{rid}", fee,
                     f"licence fee of base model {rid} (owner {owner}): {fee} once, only if the run delivers "
                     "its LoRA", fee * MILLI)
    return replace(quote, total=quote.total + fee, items=(*quote.items, item), owner_fee=fee,
                   owner_fee_legs=legs)

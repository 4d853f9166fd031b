"""Billing settings (the `billing:` section of the settings tree)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EconomyConfig(BaseModel):
    """What creators earn and what extras cost (issue 20); every figure is whole buzz or whole percent."""

    model_config = ConfigDict(extra="forbid")

    licence_fee_cap: int = Field(100, ge=0, description="Highest per-image licence fee an owner may set")
    tip_step_pct: int = Field(5, ge=1, le=100, description="Tips are percentages in steps of this many percent")
    platform_share_pct: int = Field(
        30, ge=0, le=100, description="The platform's share of creator income (licence fees, creator tips), rounded down"
    )
    priority_fee_per_image: dict[str, int] = Field(
        default_factory=lambda: {"low": 0, "normal": 0, "high": 2},
        description="Buzz per delivered image for each priority",
    )
    early_access_max_days: int = Field(60, ge=0, description="Longest early-access window an owner may set")
    unlock_price_cap: int = Field(10_000, ge=0, description="Highest early-access unlock price")
    max_contribution_goal: int = Field(1_000_000, ge=0, description="Highest contribution goal")


class BillingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pricing_file: str = "pricing.yaml"
    default_hold_ttl_s: int = Field(3600, gt=0, description="Expiry of a hold when the caller gives none")
    max_hold_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="Longest a hold may stay open (training runs)")
    daily_allowance: int = Field(25, ge=0, description="Free buzz per user per UTC day from `promo`; 0 turns it off")
    max_amount: int = Field(10**12, gt=0, description="Largest single amount; keeps sums far from 64-bit limits")
    expired_hold_grace_s: int = Field(
        300, ge=0, description="verify() reports open holds expired longer ago than this (the reaper is late)"
    )
    system_account_shards: int = Field(
        16, ge=1, le=256, description="Balance rows per system account, so concurrent captures do not queue on one"
    )
    retry_attempts: int = Field(12, ge=1, description="Tries per operation on PostgreSQL deadlock/serialization errors")
    economy: EconomyConfig = Field(default_factory=EconomyConfig)

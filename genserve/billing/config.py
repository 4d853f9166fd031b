"""Billing settings (the `billing:` section of the settings tree)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class BillingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pricing_file: str = "pricing.yaml"

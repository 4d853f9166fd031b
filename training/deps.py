"""Everything a training service or job process works with, built once from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from genserve.billing.ledger import Ledger
from genserve.billing.pricing import Pricing
from genserve.core.config import Settings
from genserve.core.db import Database
from genserve.core.storage import ObjectStore, object_store_from_settings
from genserve.economy.store import Economy
from genserve.resources.registry import ResourceRegistry
from safety.audit_log import AuditLog
from safety.gate import SafetyGate
from safety.image_scan import ImageScanner
from safety.likeness import LikenessBlocklist
from training.config import TrainingLimits
from training.records import TrainingRecords


@dataclass
class TrainingDeps:
    settings: Settings
    db: Database
    store: ObjectStore
    ledger: Ledger
    pricing: Pricing
    limits: TrainingLimits
    registry: ResourceRegistry
    records: TrainingRecords
    safety: SafetyGate
    scanner: ImageScanner

    @classmethod
    def from_settings(cls, settings: Settings, db: Database | None = None, *,
                      scanner: ImageScanner | None = None) -> TrainingDeps:
        """`scanner` replaces the configured image scan (tests stand in for NudeNet's nude classes)."""
        db = db or Database.from_settings(settings)
        store = object_store_from_settings(settings)
        store.ensure_bucket()
        safety = SafetyGate.build(settings.safety, settings.config_dir, db.session)
        return cls(
            settings=settings,
            db=db,
            store=store,
            ledger=Ledger(db, settings.billing),
            pricing=Pricing.from_settings(settings),
            limits=TrainingLimits.from_settings(settings),
            registry=ResourceRegistry(db, store),
            records=TrainingRecords(db),
            safety=safety,
            scanner=scanner or safety.image_scanner(),
        )

    @cached_property
    def economy(self) -> Economy:
        """Owners' terms on resources: the base model's licence fee and early access."""
        return Economy(self.db, self.ledger, self.settings.billing)

    @property
    def blocklist(self) -> LikenessBlocklist:
        return self.safety.blocklist

    @property
    def audit(self) -> AuditLog:
        return self.safety.audit

    @property
    def work_dir(self) -> Path:
        return (self.settings.training.work_dir or self.settings.data_dir / "training").resolve()

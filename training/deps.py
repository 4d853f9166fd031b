"""Everything a training service or job process works with, built once from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genserve.billing.ledger import Ledger
from genserve.billing.pricing import Pricing
from genserve.core.config import Settings
from genserve.core.db import Database
from genserve.core.storage import ObjectStore, object_store_from_settings
from genserve.resources.registry import ResourceRegistry
from safety.audit_log import AuditLog
from safety.image_scan import ImageScanner
from safety.likeness import LikenessBlocklist, LikenessConfig
from safety.policy import SafetyPolicy
from safety.prompt_audit import PromptAuditor
from safety.store import person_names
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
    auditor: PromptAuditor
    scanner: ImageScanner
    policy: SafetyPolicy
    blocklist: LikenessBlocklist
    audit: AuditLog

    @classmethod
    def from_settings(cls, settings: Settings, db: Database | None = None, *,
                      scanner: ImageScanner | None = None) -> TrainingDeps:
        """`scanner` replaces the configured image scan (tests stand in for NudeNet's nude classes)."""
        db = db or Database.from_settings(settings)
        store = object_store_from_settings(settings)
        store.ensure_bucket()
        rules_dir = settings.config_path(settings.safety.rules_dir)
        with db.session() as s:
            names = person_names(s)
        auditor = PromptAuditor.from_dir(rules_dir, extra_person_names=names)
        audit = AuditLog(db.session)
        return cls(
            settings=settings,
            db=db,
            store=store,
            ledger=Ledger(db, settings.billing),
            pricing=Pricing.from_settings(settings),
            limits=TrainingLimits.from_settings(settings),
            registry=ResourceRegistry(db, store),
            records=TrainingRecords(db),
            auditor=auditor,
            scanner=scanner or ImageScanner.from_config(rules_dir / settings.safety.image_scan_file),
            policy=SafetyPolicy(auditor),
            blocklist=LikenessBlocklist(db.session, LikenessConfig.load(rules_dir / settings.safety.likeness_file),
                                        audit_log=audit),
            audit=audit,
        )

    @property
    def work_dir(self) -> Path:
        return (self.settings.training.work_dir or self.settings.data_dir / "training").resolve()

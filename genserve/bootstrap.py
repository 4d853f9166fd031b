"""Embedded defaults: what `genserve serve` puts in place so the service works with no set-up.

Builds the tiny models when they are missing, publishes the checkpoints listed in
`configs/models.yaml` into the object store and registers them, and grants the demo user a starting
balance. Every step is idempotent (the models' manifest, content-addressed publishing, registration by
id and content, a keyed ledger grant), so it runs on every start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genserve.billing.ledger import Ledger, user_account
from genserve.core.config import Settings
from genserve.core.db import Database
from genserve.core.storage import ObjectStore
from genserve.resources.cache import publish_folder
from genserve.resources.catalog import load_model_catalog
from genserve.resources.registry import RESOURCE_PREFIX, ResourceRegistry
from genserve.tinymodels import build_tiny_models

# keyed by the amount too: raising the configured starting balance tops the demo user up once more
DEMO_GRANT_KEY = "bootstrap:demo-grant:{user}:{amount}"
CONFIG_PREFIX = f"{RESOURCE_PREFIX}/config"


@dataclass
class BootstrapReport:
    models_dir: Path
    checkpoints: list[str] = field(default_factory=list)
    demo_user: str = ""
    demo_balance: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"models_dir": str(self.models_dir), "checkpoints": self.checkpoints, "demo_user": self.demo_user,
                "demo_balance": self.demo_balance}


def register_checkpoints(settings: Settings, registry: ResourceRegistry) -> list[str]:
    """Publish and register every checkpoint of `configs/models.yaml` whose files are present.

    A single-file checkpoint's config folder (architecture, tokenizers, scheduler) is published too,
    and recorded in the resource's `meta` so a worker can rebuild the pipeline offline.
    """
    registered = []
    for entry in load_model_catalog(settings.models_file).checkpoints:
        path = settings.models_dir / entry.path
        if not path.exists():
            continue
        meta: dict[str, Any] = {}
        if entry.config:
            config = publish_folder(registry.store, settings.models_dir / entry.config, CONFIG_PREFIX)
            meta["config"] = {"storage_key": config.storage_key, "sha256": config.sha256}
        registry.publish(path, id=entry.id, kind="checkpoint", family=entry.family, meta=meta)
        registered.append(entry.id)
    return registered


def bootstrap(settings: Settings, db: Database, store: ObjectStore, *, build_models: bool = True) -> BootstrapReport:
    """Tiny models, registered checkpoints and a funded demo user (on an already migrated database)."""
    if build_models:
        build_tiny_models(settings.models_dir)
    registry = ResourceRegistry(db, store)
    report = BootstrapReport(models_dir=settings.models_dir, checkpoints=register_checkpoints(settings, registry))
    user = settings.generation.demo_user
    ledger = Ledger(db, settings.billing)
    if user and settings.generation.demo_balance > 0:
        amount = settings.generation.demo_balance
        ledger.grant(user_account(user), amount, DEMO_GRANT_KEY.format(user=user, amount=amount),
                     reason="starting balance of the local demo user")
    report.demo_user = user
    report.demo_balance = ledger.balance(user_account(user)).available if user else 0
    return report

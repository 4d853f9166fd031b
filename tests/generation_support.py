"""The generation service with one in-process engine per family of the catalog (no Ray): the same
flow the Serve application runs, for tests and benchmarks."""

from __future__ import annotations

from typing import Any

from genserve.core.config import Settings
from genserve.core.db import Database
from genserve.core.storage import ObjectStore, object_store_from_settings
from genserve.generation.service import GenerationService
from genserve.generation.worker.core import WorkerCore
from genserve.generation.worker.local import InProcessWorkers
from genserve.resources.catalog import load_model_catalog


def in_process_service(settings: Settings, *, db: Database | None = None, store: ObjectStore | None = None,
                       scanner: Any | None = None) -> GenerationService:
    db = db or Database.from_settings(settings)
    store = store or object_store_from_settings(settings)
    families = load_model_catalog(settings.models_file).families
    cores = {f: WorkerCore(f, settings, db=db, store=store, scanner=scanner) for f in families}
    return GenerationService(settings, db, store, InProcessWorkers(cores))

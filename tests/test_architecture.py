"""The layering the design promises, checked on the real import graph, and the one safety gate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

_IMPORT_ALL = """
import importlib, pkgutil, sys
roots = {roots!r}
for root in roots:
    pkg = importlib.import_module(root)
    if hasattr(pkg, "__path__"):
        for m in pkgutil.walk_packages(pkg.__path__, root + "."):
            if ".migrations" not in m.name:
                importlib.import_module(m.name)
banned = {banned!r}
print("\\n".join(sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in banned))))
"""


def _imported(roots: list[str], banned: list[str]) -> list[str]:
    code = _IMPORT_ALL.format(roots=roots, banned=banned)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line]


def test_core_imports_nothing_above_it():
    assert _imported(["genserve.core"], ["genserve.generation", "genserve.resources", "genserve.billing",
                                         "training"]) == []


def test_safety_imports_neither_genserve_nor_training():
    assert _imported(["safety"], ["genserve", "training", "ray", "fastapi"]) == []


def test_training_imports_no_generation_internals():
    assert _imported(["training"], ["genserve.generation", "genserve.ingress", "genserve.app"]) == []


def test_billing_modules_import_no_safety():
    """Billing's own modules (the floor under them loads safety's tables for migrations)."""
    import ast

    for path in (ROOT / "genserve" / "billing").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {n for n in names if n.split(".")[0] in ("safety", "training")}, path


@pytest.fixture()
def config_copy(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path / "configs"


def _set_threshold(config_dir: Path, value: float) -> None:
    path = config_dir / "safety" / "likeness.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["containment_threshold"] = value
    path.write_text(yaml.safe_dump(doc))


def test_worker_and_ingress_read_the_same_likeness_config(config_copy, tmp_path):
    """Both sides build their blocklist through the gate from configs/safety/likeness.yaml: changing the
    file changes both (the worker once ignored it and used built-in thresholds)."""
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from genserve.core.storage import object_store_from_settings
    from genserve.generation.service import GenerationService
    from genserve.generation.worker.core import WorkerCore
    from genserve.generation.worker.local import InProcessWorkers

    for value in (0.31, 0.62):
        _set_threshold(config_copy, value)
        settings = load_settings(config_dir=config_copy, env={"GENSERVE_DATA_DIR": str(tmp_path / "data")})
        db = Database.from_settings(settings)
        db.migrate()
        store = object_store_from_settings(settings)
        worker = WorkerCore("sd1", settings, db=db, store=store)
        ingress = GenerationService(settings, db, store, InProcessWorkers({"sd1": worker}))
        assert worker.blocklist.config.containment_threshold == value
        assert ingress.safety.blocklist.config.containment_threshold == value
        worker.close()


def test_a_weakening_likeness_threshold_is_refused_at_start(config_copy, tmp_path):
    from genserve.core.config import load_settings
    from genserve.core.db import Database
    from safety.gate import SafetyGate

    _set_threshold(config_copy, 1.0)
    settings = load_settings(config_dir=config_copy, env={"GENSERVE_DATA_DIR": str(tmp_path / "data")})
    db = Database.from_settings(settings)
    db.migrate()
    with pytest.raises(Exception) as info:
        SafetyGate.build(settings.safety, settings.config_dir, db.session)
    assert "threshold" in str(info.value)

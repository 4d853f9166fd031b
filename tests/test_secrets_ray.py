"""No secret reaches Ray: after a training run as a real Ray Job, no secret value is in Ray's session
folder (logs, runtime_env agent logs, job records) nor in the job's stored runtime_env or metadata
(issue 17, finding 2). The job gets the secrets by reference and still works with them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_training_ray import require_job_agent, wait_for
from training_support import fund, register_base_models, toy_zip

from genserve.core.config import load_settings
from genserve.core.db import Database
from training.deps import TrainingDeps
from training.service import Submission, TrainingService

pytestmark = pytest.mark.ray

PARAMS = {"epochs": 1, "repeats": 1, "batch_size": 2, "network_dim": 4, "network_alpha": 2,
          "gradient_checkpointing": False, "seed": 3}


def _grep(folder: Path, needles: dict[str, str]) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{name} in {path}" for name, value in needles.items() if value.encode() in data]
    return found


def test_secrets_never_reach_rays_logs_or_job_records(tmp_path: Path, tiny_models, ray_session, postgres_url):
    secrets = {
        "service token": "svc-9f1c2e7a4b8d0e6f3a5c7b9d1e2f4a6c",
        "admin token": "adm-1b3d5f7a9c2e4a6c8e0f1d3b5a7c9e2f",
        "database password": "dbpw-6e8a0c2e4b6d8f1a",
        "s3 key id": "AKIA7Q2W4E6R8T0Y1U3I",
        "s3 secret": "s3sk-3c5e7a9b1d2f4e6a8c0b2d4f6a8e0c1b",
    }
    database_url = postgres_url.replace("postgres@", f"postgres:{secrets['database password']}@")
    settings = load_settings(env={
        "GENSERVE_DATA_DIR": str(tmp_path / "data"), "GENSERVE_DATABASE_URL": database_url,
        "GENSERVE_SERVICE_TOKEN": secrets["service token"], "GENSERVE_ADMIN_TOKEN": secrets["admin token"],
        "GENSERVE_S3_ACCESS_KEY_ID": secrets["s3 key id"], "GENSERVE_S3_SECRET_ACCESS_KEY": secrets["s3 secret"],
    }, overrides={"training": {"progress_interval_s": 0}})
    db = Database.from_settings(settings)
    db.migrate()
    deps = TrainingDeps.from_settings(settings, db)
    register_base_models(deps, tiny_models)
    fund(deps, "alice", 1000)
    service = TrainingService(deps)
    require_job_agent(service.launcher.client)

    row = service.submit("alice", toy_zip(tmp_path / "toy.zip"), Submission("sd1", real_person=False, params=PARAMS))
    done = wait_for(lambda: (r := service.get(row.id, "alice")).status in ("succeeded", "failed") and r, 300,
                    "the end of the job", interval_s=0.5)
    # the job read the database with the password it got by reference: it could not have finished otherwise
    assert done.status == "succeeded", (done.error_code, done.error_message, service.launcher.logs(done.ray_job_id))

    info = service.launcher.client.get_job_info(done.ray_job_id)
    stored = json.dumps({"runtime_env": info.runtime_env, "metadata": info.metadata, "entrypoint": info.entrypoint},
                        default=str)
    assert not [name for name, value in secrets.items() if value in stored]

    import ray

    time.sleep(1.0)  # let Ray flush its log files
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir()
    assert _grep(session, secrets) == []
    db.dispose()

"""Session-wide fixtures: offline hub, settings on a temp data dir, PostgreSQL, tiny models, Ray, S3.

Expensive things (tiny models, Ray, the S3 server) start once per session.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
from engine_support import load_tiny, one_torch_thread

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

POSTGRES_URL = os.environ.get("GENSERVE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_reachable(url: str) -> str | None:
    """None when reachable, else the reason it is not."""
    try:
        from sqlalchemy import create_engine, text

        eng = create_engine(url, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not here"
        return f"PostgreSQL not reachable at {url}: {type(exc).__name__}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The PostgreSQL server URL; skips (with the reason) where none runs. CI has one."""
    reason = _postgres_reachable(POSTGRES_URL)
    if reason:
        if os.environ.get("CI") and not os.environ.get("GENSERVE_ALLOW_NO_POSTGRES"):
            pytest.fail(reason + " (CI must run the PostgreSQL tests)")
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture
def postgres_url(postgres_server_url: str):
    """A fresh, empty schema-per-test database URL (a new database dropped afterwards)."""
    from sqlalchemy import create_engine, text

    name = f"gs_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server_url.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def settings(tmp_path: Path):
    """Settings on a fresh data dir, repository configs, SQLite."""
    from genserve.core.config import load_settings

    return load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path / "data")})


@pytest.fixture
def db(settings):
    """A migrated SQLite database for one test."""
    from genserve.core.db import Database

    database = Database.from_settings(settings)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def pg_db(postgres_url: str):
    """A migrated PostgreSQL database for one test."""
    from genserve.core.db import Database

    database = Database(postgres_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random-weight SD1 and SDXL models (diffusers folders, single files, safety embeddings), built once."""
    from genserve.tinymodels import build_tiny_models

    models_dir = tmp_path_factory.mktemp("models")
    return build_tiny_models(models_dir, seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol HTTP server on loopback (moto's server mode). Yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole session. Its dashboard process runs because the Ray Job server
    (training jobs, `JobSubmissionClient()`) lives there; it costs about 0.5 GB more.
    `GENSERVE_SERVER__HTTP_INGRESS=haproxy` runs the session's HTTP over HAProxy, as the RayService does."""
    import ray

    from genserve.app import ingress_environment
    from genserve.core.config import load_settings

    if not ray.is_initialized():
        os.environ.update(ingress_environment(load_settings()))
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            log_to_driver=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pipes(tiny_models):
    """family -> (pipeline, safety embeddings), each loaded once for the module."""
    loaded = {}

    def get(family):  # noqa: ANN001, ANN202
        if family not in loaded:
            with one_torch_thread():
                loaded[family] = load_tiny(tiny_models[family])
        return loaded[family]

    return get

"""One typed settings tree, loaded from `configs/genserve.yaml` and `GENSERVE_*` variables.

The tree is built once at a process's entry point and passed down explicitly; nothing deep
inside the service reads the environment. Precedence: explicit overrides > environment > YAML
> defaults. Besides the flat names in `ENV_ALIASES`, any field can be set with
`GENSERVE_<SECTION>__<FIELD>` (`null`, lists and mappings in YAML syntax; other values are
converted by the field's type).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from genserve.core.config.billing import BillingConfig
from genserve.core.config.generation import GenerationConfig
from genserve.core.config.training import TrainingConfig
from genserve.core.config.worker import WorkerConfig
from genserve.core.errors import ConfigError
from safety.config import SafetyConfig

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_DIR = PACKAGE_ROOT.parent / "configs"
SETTINGS_FILE = "genserve.yaml"
MODELS_FILE = "models.yaml"

# Flat, documented environment names -> dotted paths in the tree.
ENV_ALIASES: dict[str, str] = {
    "GENSERVE_DATA_DIR": "data_dir",
    "GENSERVE_DATABASE_URL": "database.url",
    "GENSERVE_SERVICE_TOKEN": "auth.service_token",
    "GENSERVE_ADMIN_TOKEN": "auth.admin_token",
    "GENSERVE_PREVIOUS_SERVICE_TOKEN": "auth.previous_service_token",
    "GENSERVE_PREVIOUS_ADMIN_TOKEN": "auth.previous_admin_token",
    "GENSERVE_STORAGE_BACKEND": "storage.backend",
    "GENSERVE_S3_ENDPOINT_URL": "storage.s3_endpoint_url",
    "GENSERVE_S3_BUCKET": "storage.s3_bucket",
    "GENSERVE_S3_REGION": "storage.s3_region",
    "GENSERVE_S3_ACCESS_KEY_ID": "storage.s3_access_key_id",
    "GENSERVE_S3_SECRET_ACCESS_KEY": "storage.s3_secret_access_key",
    "GENSERVE_LOG_LEVEL": "logging.level",
    "GENSERVE_LOG_JSON": "logging.json_lines",
    "GENSERVE_HOST": "server.host",
    "GENSERVE_PORT": "server.port",
    "GENSERVE_RAY_ADDRESS": "server.ray_address",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseConfig(_Section):
    url: str | None = Field(None, description="SQLAlchemy URL; default is a SQLite file in the data dir")
    echo: bool = False
    pool_size: int = 10
    sqlite_busy_timeout_ms: int = 30_000


class StorageConfig(_Section):
    backend: Literal["local", "s3"] = "local"
    local_root: Path | None = Field(None, description="default: <data_dir>/objects")
    s3_endpoint_url: str | None = None
    s3_bucket: str = "genserve"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "path"
    multipart_threshold_bytes: int = 8 * 1024 * 1024
    multipart_chunk_bytes: int = 8 * 1024 * 1024
    presign_expiry_s: int = 3600


class AuthConfig(_Section):
    # Local defaults so the embedded service works without set-up; deployments set real secrets.
    service_token: SecretStr = SecretStr("local-service-token")
    admin_token: SecretStr = SecretStr("local-admin-token")
    # Set during a rotation: the old token keeps working until every caller has the new one.
    previous_service_token: SecretStr | None = None
    previous_admin_token: SecretStr | None = None


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = Field(None, description="None starts a local Ray")
    num_cpus: int | None = None
    serve_config: str = "serve.local.yaml"
    # who answers HTTP on a Ray that `genserve serve` starts itself: Serve's Python proxy, or Ray
    # Serve's HAProxy ingress, which sends each request straight to an ingress replica (no proxy
    # actor hop, no body fetched back over Ray). HAProxy binds its stats and metrics ports on every
    # interface, so it is meant for single-tenant hosts; a cluster sets RAY_SERVE_ENABLE_HA_PROXY itself.
    http_ingress: Literal["proxy", "haproxy"] = "proxy"


class LoggingConfig(_Section):
    level: str = "INFO"
    json_lines: bool = False


class Settings(_Section):
    data_dir: Path = Path(".genserve")
    config_dir: Path = DEFAULT_CONFIG_DIR
    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig = StorageConfig()
    auth: AuthConfig = AuthConfig()
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    billing: BillingConfig = BillingConfig()
    safety: SafetyConfig = SafetyConfig()
    training: TrainingConfig = TrainingConfig()
    generation: GenerationConfig = GenerationConfig()
    worker: WorkerConfig = WorkerConfig()

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.data_dir / 'genserve.db').resolve()}"

    @property
    def objects_dir(self) -> Path:
        return (self.storage.local_root or self.data_dir / "objects").resolve()

    @property
    def models_dir(self) -> Path:
        """Where tiny models are built and downloaded resources are cached."""
        return (self.data_dir / "models").resolve()

    @property
    def models_file(self) -> Path:
        """The model catalog: families, their safety embeddings, checkpoints."""
        return self.config_path(MODELS_FILE)

    def config_path(self, name: str) -> Path:
        """A file under the config dir (pricing.yaml, models.yaml, safety/*.yaml ...)."""
        return self.config_dir / name

    def to_env(self) -> dict[str, str]:
        """Environment that reproduces these settings in a child process (Ray workers, jobs)."""
        return {"GENSERVE_SETTINGS_JSON": json.dumps(settings_dump(self), default=str)}


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _env_value(value: str) -> Any:
    """YAML only for null, lists and mappings; scalars stay strings for pydantic to convert by
    field type, so a token "0042" or a bucket named "yes" is not turned into a number or a bool."""
    try:
        parsed = yaml.safe_load(value) if value else value
    except yaml.YAMLError:
        return value
    return parsed if parsed is None or isinstance(parsed, (list, dict)) else value


def _env_tree(env: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in env.items():
        if name in ENV_ALIASES:
            _set_path(tree, ENV_ALIASES[name], value)
        elif name.startswith("GENSERVE_") and "__" in name:
            dotted = name[len("GENSERVE_"):].lower().replace("__", ".")
            _set_path(tree, dotted, _env_value(value))
    return tree


def _reveal_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _reveal_secrets(v) for k, v in data.items()}
    if isinstance(data, SecretStr):
        return data.get_secret_value()
    return data


def load_settings(
    config_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings tree. A child process started with `Settings.to_env()` gets the same tree."""
    env = os.environ if env is None else env
    if "GENSERVE_SETTINGS_JSON" in env and config_dir is None and not overrides:
        return Settings.model_validate_json(env["GENSERVE_SETTINGS_JSON"])
    cdir = Path(config_dir or env.get("GENSERVE_CONFIG_DIR") or DEFAULT_CONFIG_DIR).resolve()
    tree: dict[str, Any] = {}
    file = cdir / SETTINGS_FILE
    if file.exists():
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file} must hold a mapping", code="config_invalid")
        tree = loaded
    tree = _merge(tree, _env_tree(env))
    if overrides:
        tree = _merge(tree, overrides)
    tree["config_dir"] = str(cdir)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}", code="config_invalid") from exc
    return settings.model_copy(update={"data_dir": settings.data_dir.expanduser().resolve()})


def settings_dump(settings: Settings) -> dict[str, Any]:
    """Plain dict with secrets revealed, for handing to Ray actors."""
    return _reveal_secrets(settings.model_dump())

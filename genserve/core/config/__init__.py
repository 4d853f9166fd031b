"""One typed settings tree, loaded from `configs/genserve.yaml` and `GENSERVE_*` variables.

The tree is built once at a process's entry point and passed down explicitly; nothing deep
inside the service reads the environment. Precedence: explicit overrides > environment > YAML
> defaults. Besides the flat names in `ENV_ALIASES`, any field can be set with
`GENSERVE_<SECTION>__<FIELD>` (`null`, lists and mappings in YAML syntax; other values are
converted by the field's type).

Past 450 lines on purpose: the root of the tree, its environment loading and the deployment check that
refuses unsafe settings read the same fields, and one file keeps what an operator may set in one place
(each section's own fields are in the sibling modules).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import stat
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

# Settings that are secrets. They never travel inside GENSERVE_SETTINGS_JSON, a Ray runtime_env, a
# Serve deployment's arguments or job metadata: a child process gets them by reference, from its own
# environment (the deployment's secret) or from a file only its user can read (`SECRETS_FILE_ENV`).
SECRET_PATHS: tuple[str, ...] = (
    "database.url",  # may hold a password
    "auth.service_token",
    "auth.admin_token",
    "auth.previous_service_token",
    "auth.previous_admin_token",
    "storage.s3_access_key_id",
    "storage.s3_secret_access_key",
)
SECRETS_FILE_ENV = "GENSERVE_SECRETS_FILE"
SETTINGS_JSON_ENV = "GENSERVE_SETTINGS_JSON"
DEFAULT_TOKENS = frozenset({"local-service-token", "local-admin-token"})
MIN_TOKEN_CHARS = 32


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

    def to_env(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment that reproduces these settings in a child process (Ray workers, jobs): the
        settings without their secrets, and the secrets by reference (see `settings_handoff`)."""
        return {SETTINGS_JSON_ENV: json.dumps(settings_handoff(self, env), default=str)}

    def is_local(self) -> bool:
        """The embedded defaults on one machine: SQLite, local files, a loopback host, a Ray of its own."""
        return not deployment_traits(self)


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
    if SETTINGS_JSON_ENV in env and config_dir is None and not overrides:
        return settings_from_handoff(json.loads(env[SETTINGS_JSON_ENV]), env)
    cdir = Path(config_dir or env.get("GENSERVE_CONFIG_DIR") or DEFAULT_CONFIG_DIR).resolve()
    tree: dict[str, Any] = {}
    file = cdir / SETTINGS_FILE
    if file.exists():
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file} must hold a mapping", code="config_invalid")
        tree = loaded
    if env.get(SECRETS_FILE_ENV):
        tree = _merge(tree, read_secrets_file(Path(env[SECRETS_FILE_ENV])))
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


# ------------------------------------------------------------------------------------- secrets


def _get_path(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _pop_path(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = tree
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(last, None)


def secret_values(settings: Settings) -> dict[str, str]:
    """Every secret that is set, by dotted path, revealed."""
    dumped = settings_dump(settings)
    return {p: str(v) for p in SECRET_PATHS if (v := _get_path(dumped, p)) is not None}


def public_dump(settings: Settings) -> dict[str, Any]:
    """The settings tree without any secret: safe for logs, runtime_env and job metadata."""
    tree = settings.model_dump(mode="json")
    for p in SECRET_PATHS:
        _pop_path(tree, p)
    return tree


def read_secrets_file(path: Path) -> dict[str, Any]:
    """A YAML/JSON mapping in the settings tree's shape (`auth: {service_token: ...}`). Refused unless
    only its owner can read it (mode 0600 or 0400), and when it holds anything but secrets."""
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise ConfigError(f"secrets file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                              "it must be 0600 or 0400", code="secrets_file_insecure")
        loaded = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read secrets file {path}: {exc}", code="secrets_file_unreadable") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"secrets file {path} is not YAML/JSON", code="secrets_file_invalid") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"secrets file {path} must hold a mapping", code="secrets_file_invalid")
    tree: dict[str, Any] = {}
    for p in SECRET_PATHS:
        value = _get_path(loaded, p)
        if value is not None:
            _set_path(tree, p, str(value))
    return tree


def _env_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """The secrets an environment names (flat aliases and `GENSERVE_<SECTION>__<FIELD>`)."""
    tree = _env_tree({k: v for k, v in env.items() if k.startswith("GENSERVE_")})
    return {p: str(v) for p in SECRET_PATHS if (v := _get_path(tree, p)) is not None}


def write_secrets_file(settings: Settings, secrets_: Mapping[str, str]) -> Path:
    """The secrets in a file only this user can read, under `<data_dir>/run/` (a folder of mode 0700).
    Named by a hash of its content, so every process with the same secrets shares one file."""
    tree: dict[str, Any] = {}
    for p, v in sorted(secrets_.items()):
        _set_path(tree, p, v)
    body = json.dumps(tree, sort_keys=True).encode()
    folder = settings.data_dir.resolve() / "run"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    path = folder / f"secrets-{hashlib.sha256(body).hexdigest()[:16]}.json"
    if path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == body:
        return path
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, body)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def settings_handoff(settings: Settings, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a child process (Serve replica, Ray Job) is given to rebuild these settings, with no
    secret value inside: `settings` (the public tree), `secrets` (the paths the child must find) and
    `secrets_file` (a 0600 file, or None when this process's environment, which the child shares
    through the deployment's secret, already names every secret with the same value)."""
    env = os.environ if env is None else env
    secrets_ = secret_values(settings)
    from_env = _env_secrets(env)
    if env.get(SECRETS_FILE_ENV):
        with_file = {**_flatten_secrets(read_secrets_file(Path(env[SECRETS_FILE_ENV]))), **from_env}
    else:
        with_file = from_env
    file: str | None
    if all(with_file.get(p) == v for p, v in secrets_.items()):
        file = env.get(SECRETS_FILE_ENV) or None
    else:
        file = str(write_secrets_file(settings, secrets_))
    return {"settings": public_dump(settings), "secrets": sorted(secrets_), "secrets_file": file}


def _flatten_secrets(tree: Mapping[str, Any]) -> dict[str, str]:
    return {p: str(v) for p in SECRET_PATHS if (v := _get_path(tree, p)) is not None}


def is_handoff(data: Any) -> bool:
    return isinstance(data, Mapping) and set(data) == {"settings", "secrets", "secrets_file"}


def settings_from_handoff(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Settings rebuilt from `settings_handoff`: the secrets come from the handed file when this
    machine has it, else from this process's environment; one that neither has is a refusal (never a
    silent default such as SQLite in place of the database). A plain settings dump is also taken."""
    env = os.environ if env is None else env
    if not is_handoff(data):
        return Settings.model_validate(data)
    tree = json.loads(json.dumps(data["settings"]))
    found: dict[str, str] = {}
    file = data.get("secrets_file")
    if file and Path(file).exists():
        found.update(_flatten_secrets(read_secrets_file(Path(file))))
    elif env.get(SECRETS_FILE_ENV):
        found.update(_flatten_secrets(read_secrets_file(Path(env[SECRETS_FILE_ENV]))))
    for p, v in _env_secrets(env).items():
        found.setdefault(p, v)
    missing = [p for p in data["secrets"] if p not in found]
    if missing:
        raise ConfigError(f"secrets not provided to this process: {', '.join(missing)} (set them from the "
                          f"deployment's secret as GENSERVE_* variables, or in the file named by {SECRETS_FILE_ENV})",
                          code="secrets_missing")
    for p in data["secrets"]:
        _set_path(tree, p, found[p])
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}", code="config_invalid") from exc


# ------------------------------------------------------------------------- deployment checks


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def deployment_traits(settings: Settings) -> list[str]:
    """Why these settings are not the embedded, single-machine defaults (empty when they are)."""
    traits = []
    if not settings.database_url.startswith("sqlite"):
        traits.append("a database server (database.url)")
    if settings.storage.backend != "local":
        traits.append(f"the {settings.storage.backend} object store")
    if not _loopback(settings.server.host):
        traits.append(f"host {settings.server.host}")
    if settings.server.ray_address:
        traits.append("a Ray cluster (server.ray_address)")
    return traits


def token_problems(settings: Settings) -> list[str]:
    """What is wrong with the bearer tokens for a deployment: default, short or shared tokens."""
    problems = []
    named = {
        "GENSERVE_SERVICE_TOKEN": settings.auth.service_token,
        "GENSERVE_ADMIN_TOKEN": settings.auth.admin_token,
        "GENSERVE_PREVIOUS_SERVICE_TOKEN": settings.auth.previous_service_token,
        "GENSERVE_PREVIOUS_ADMIN_TOKEN": settings.auth.previous_admin_token,
    }
    for name, secret in named.items():
        if secret is None:
            continue
        value = secret.get_secret_value()
        if value in DEFAULT_TOKENS:
            problems.append(f"{name} is the built-in local default")
        elif len(value) < MIN_TOKEN_CHARS:
            problems.append(f"{name} is shorter than {MIN_TOKEN_CHARS} characters")
    if settings.auth.service_token.get_secret_value() == settings.auth.admin_token.get_secret_value():
        problems.append("GENSERVE_SERVICE_TOKEN and GENSERVE_ADMIN_TOKEN are the same")
    return problems


def check_deployment(settings: Settings) -> None:
    """Refuse to start a non-local configuration (database server, S3, a public host, a Ray cluster)
    whose tokens are the local defaults, short or shared. The embedded defaults start as they are."""
    traits = deployment_traits(settings)
    problems = token_problems(settings) if traits else []
    if problems:
        raise ConfigError(
            f"refusing to start: this is not a local configuration ({'; '.join(traits)}) and "
            f"{'; '.join(problems)}. Set each token from the deployment's secret (at least {MIN_TOKEN_CHARS} "
            "random characters, e.g. `openssl rand -hex 32`); see deploy/RUNBOOK.md.",
            code="insecure_deployment", details={"traits": traits, "problems": problems},
        )

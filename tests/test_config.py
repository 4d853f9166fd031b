"""Settings: YAML, GENSERVE_* variables, precedence, validation and hand-over to child processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.core.config import DEFAULT_CONFIG_DIR, Settings, load_settings, settings_dump
from genserve.core.errors import ConfigError


def write_config(dir_: Path, text: str) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "genserve.yaml").write_text(text)
    return dir_


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "configs",
        f"""
data_dir: {tmp_path / "yaml-data"}
server:
  port: 9001
  host: 0.0.0.0
storage:
  backend: s3
  s3_bucket: from-yaml
logging:
  level: DEBUG
""",
    )


def test_repository_yaml_loads_with_embedded_defaults(tmp_path: Path):
    s = load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path / "d")})
    assert s.config_dir == DEFAULT_CONFIG_DIR.resolve()
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.storage.backend == "local"
    assert s.objects_dir == (tmp_path / "d" / "objects").resolve()
    assert s.models_dir == (tmp_path / "d" / "models").resolve()
    assert s.config_path("models.yaml") == DEFAULT_CONFIG_DIR.resolve() / "models.yaml"


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path):
    s = load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path / "d")})
    assert s.database.url is None
    assert s.database_url == f"sqlite:///{(tmp_path / 'd' / 'genserve.db').resolve()}"


def test_yaml_values_are_read(config_dir: Path, tmp_path: Path):
    s = load_settings(config_dir=config_dir, env={})
    assert s.data_dir == (tmp_path / "yaml-data").resolve()
    assert (s.server.port, s.server.host) == (9001, "0.0.0.0")
    assert (s.storage.backend, s.storage.s3_bucket) == ("s3", "from-yaml")
    assert s.logging.level == "DEBUG"
    assert s.server.ray_address is None  # not in the file: default


def test_config_dir_from_environment(config_dir: Path):
    s = load_settings(env={"GENSERVE_CONFIG_DIR": str(config_dir)})
    assert s.config_dir == config_dir.resolve()
    assert s.server.port == 9001


def test_missing_yaml_means_defaults(tmp_path: Path):
    s = load_settings(config_dir=tmp_path / "empty", env={})
    assert s.server.port == 8000
    assert s.storage.backend == "local"
    assert s.data_dir == Path(".genserve").resolve()


def test_flat_environment_aliases(tmp_path: Path):
    env = {
        "GENSERVE_DATA_DIR": str(tmp_path / "env-data"),
        "GENSERVE_DATABASE_URL": "postgresql+psycopg2://u:p@db:5432/gs",
        "GENSERVE_SERVICE_TOKEN": "svc-secret",
        "GENSERVE_ADMIN_TOKEN": "adm-secret",
        "GENSERVE_S3_ENDPOINT_URL": "http://minio:9000",
        "GENSERVE_S3_BUCKET": "images",
        "GENSERVE_STORAGE_BACKEND": "s3",
        "GENSERVE_PORT": "8123",
        "GENSERVE_LOG_JSON": "true",
    }
    s = load_settings(config_dir=tmp_path / "none", env=env)
    assert s.data_dir == (tmp_path / "env-data").resolve()
    assert s.database_url == "postgresql+psycopg2://u:p@db:5432/gs"
    assert s.auth.service_token.get_secret_value() == "svc-secret"
    assert s.auth.admin_token.get_secret_value() == "adm-secret"
    assert (s.storage.backend, s.storage.s3_endpoint_url, s.storage.s3_bucket) == ("s3", "http://minio:9000", "images")
    assert s.server.port == 8123
    assert s.logging.json_lines is True
    assert "svc-secret" not in repr(s)  # secrets stay out of logs and tracebacks


def test_generic_section_field_variables(tmp_path: Path):
    env = {
        "GENSERVE_DATABASE__ECHO": "true",
        "GENSERVE_DATABASE__POOL_SIZE": "3",
        "GENSERVE_STORAGE__MULTIPART_THRESHOLD_BYTES": "5242880",
        "GENSERVE_SERVER__RAY_ADDRESS": "ray://head:10001",
        "GENSERVE_SERVER__NUM_CPUS": "null",
    }
    s = load_settings(config_dir=tmp_path / "none", env=env)
    assert s.database.echo is True
    assert s.database.pool_size == 3
    assert s.storage.multipart_threshold_bytes == 5 * 1024 * 1024
    assert s.server.ray_address == "ray://head:10001"
    assert s.server.num_cpus is None


def test_string_fields_keep_values_that_look_like_other_types(tmp_path: Path):
    """A token of digits or a bucket called 'yes' is still a string, whichever way it is set."""
    env = {
        "GENSERVE_AUTH__SERVICE_TOKEN": "123456",
        "GENSERVE_ADMIN_TOKEN": "0042",
        "GENSERVE_STORAGE__S3_BUCKET": "yes",
        "GENSERVE_LOGGING__LEVEL": "0123",
    }
    s = load_settings(config_dir=tmp_path / "none", env=env)
    assert s.auth.service_token.get_secret_value() == "123456"
    assert s.auth.admin_token.get_secret_value() == "0042"
    assert s.storage.s3_bucket == "yes"
    assert s.logging.level == "0123"


def test_unrelated_genserve_variables_are_ignored(tmp_path: Path):
    s = load_settings(config_dir=tmp_path / "none", env={"GENSERVE_TEST_POSTGRES_URL": "x", "PATH": "/bin"})
    assert s.server.port == 8000


def test_precedence_overrides_then_env_then_yaml_then_defaults(config_dir: Path):
    env = {"GENSERVE_PORT": "9002", "GENSERVE_S3_BUCKET": "from-env"}
    overrides = {"server": {"port": 9003}}

    assert load_settings(config_dir=config_dir, env={}).server.port == 9001
    from_env = load_settings(config_dir=config_dir, env=env)
    assert from_env.server.port == 9002
    assert from_env.storage.s3_bucket == "from-env"
    assert from_env.server.host == "0.0.0.0"  # the env sets one field; the rest of the section stays from YAML
    both = load_settings(config_dir=config_dir, env=env, overrides=overrides)
    assert both.server.port == 9003
    assert both.storage.s3_bucket == "from-env"
    assert both.server.host == "0.0.0.0"
    assert load_settings(config_dir=config_dir.parent / "none", env={}).server.port == 8000


@pytest.mark.parametrize(
    ("env", "yaml_text"),
    [
        ({"GENSERVE_PORT": "not-a-port"}, ""),
        ({"GENSERVE_STORAGE_BACKEND": "ftp"}, ""),
        ({"GENSERVE_DATABASE__POOL_SIZE": "[1, 2]"}, ""),
        ({}, "server:\n  port: eighty\n"),
        ({}, "- just\n- a list\n"),
        ({}, "storage: local\n"),
    ],
)
def test_invalid_values_raise_config_invalid(tmp_path: Path, env: dict, yaml_text: str):
    cdir = write_config(tmp_path / "c", yaml_text)
    with pytest.raises(ConfigError) as exc_info:
        load_settings(config_dir=cdir, env=env)
    assert exc_info.value.code == "config_invalid"


@pytest.mark.parametrize(
    ("env", "yaml_text", "overrides"),
    [
        ({}, "databse:\n  url: sqlite://\n", None),  # misspelt section
        ({}, "server:\n  prot: 1\n", None),  # misspelt field
        ({"GENSERVE_SERVER__PROT": "1"}, "", None),
        ({"GENSERVE_NOPE__X": "1"}, "", None),
        ({}, "", {"auth": {"tokne": "x"}}),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, env: dict, yaml_text: str, overrides: dict | None):
    cdir = write_config(tmp_path / "c", yaml_text)
    with pytest.raises(ConfigError) as exc_info:
        load_settings(config_dir=cdir, env=env, overrides=overrides)
    assert exc_info.value.code == "config_invalid"
    assert exc_info.value.http_status == 500


def test_to_env_round_trip_reproduces_settings_with_secrets(config_dir: Path, tmp_path: Path):
    original = load_settings(
        config_dir=config_dir,
        env={
            "GENSERVE_SERVICE_TOKEN": "svc-secret",
            "GENSERVE_S3_SECRET_ACCESS_KEY": "s3-secret",
            "GENSERVE_DATABASE_URL": "postgresql+psycopg2://u:p@db/gs",
            "GENSERVE_DATA_DIR": str(tmp_path / "data"),
        },
        overrides={"storage": {"local_root": str(tmp_path / "objs")}},
    )
    child_env = original.to_env(env={})
    assert all(k.startswith("GENSERVE_") and isinstance(v, str) for k, v in child_env.items())
    # the secrets travel by reference (a 0600 file), never in the environment handed over
    assert not any(secret in v for v in child_env.values() for secret in ("svc-secret", "s3-secret", "u:p@db"))
    # A child's own stray variables do not change what the parent handed over.
    child = load_settings(env={**child_env, "GENSERVE_PORT": "1"})
    assert isinstance(child, Settings)
    assert child == original
    assert child.auth.service_token.get_secret_value() == "svc-secret"
    assert child.storage.s3_secret_access_key.get_secret_value() == "s3-secret"
    assert child.objects_dir == (tmp_path / "objs").resolve()
    assert settings_dump(child) == settings_dump(original)


def test_settings_dump_reveals_secrets_for_actors(tmp_path: Path):
    s = load_settings(config_dir=tmp_path / "none", env={"GENSERVE_ADMIN_TOKEN": "adm"})
    dumped = settings_dump(s)
    assert dumped["auth"]["admin_token"] == "adm"
    assert Settings.model_validate(dumped) == s


def test_http_ingress_defaults_to_serves_proxy_and_refuses_others(tmp_path: Path):
    from genserve.app import ingress_environment

    settings = load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path)})
    assert settings.server.http_ingress == "proxy" and ingress_environment(settings) == {}
    with pytest.raises(ConfigError):
        load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path), "GENSERVE_SERVER__HTTP_INGRESS": "nginx"})


def test_haproxy_ingress_environment_keeps_its_admin_socket_private_and_short(tmp_path: Path):
    import os
    import stat

    from genserve.app import ingress_environment

    settings = load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path), "GENSERVE_SERVER__HTTP_INGRESS": "haproxy"})
    env = ingress_environment(settings)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    folder = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert Path(env[key]).parent == folder
    # the socket is world-writable: only its folder keeps other users out
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and os.stat(folder).st_uid == os.getuid()
    # HAProxy refuses socket paths over 97 characters; Ray puts a 56-character folder in between
    assert len(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]) + 57 <= 97
    assert ingress_environment(settings)["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != str(folder), "one folder per start"


def test_haproxy_folder_is_removed_when_the_process_exits(tmp_path: Path):
    import subprocess
    import sys

    code = ("import sys; from genserve.app import ingress_environment; from genserve.core.config import load_settings; "
            "print(ingress_environment(load_settings(env={'GENSERVE_DATA_DIR': sys.argv[1], "
            "'GENSERVE_SERVER__HTTP_INGRESS': 'haproxy'}))['RAY_SERVE_HAPROXY_SERVER_STATE_BASE'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    folder = Path(out.stdout.strip())
    assert folder.name.startswith("gs-hap-") and not folder.exists()


def test_scan_threads_follow_cpu_threads_unless_set(tmp_path: Path):
    def worker(**fields):
        return load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path)}, overrides={"worker": fields}).worker

    assert worker().image_scan_threads == 0
    assert worker(cpu_threads=1).image_scan_threads == 1
    assert worker(cpu_threads=1, scan_threads=0).image_scan_threads == 0
    assert worker(cpu_threads=4, scan_threads=2).image_scan_threads == 2

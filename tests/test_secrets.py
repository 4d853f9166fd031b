"""Secrets reach child processes by reference, and a non-local start-up refuses unsafe tokens (issue 17,
findings 1 and 2)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from genserve.core.config import (
    SECRETS_FILE_ENV,
    check_deployment,
    load_settings,
    public_dump,
    settings_from_handoff,
    settings_handoff,
)
from genserve.core.errors import ConfigError

STRONG_SERVICE = "s" * 40
STRONG_ADMIN = "a" * 40
SECRETS = {
    "GENSERVE_SERVICE_TOKEN": "svc-token-value-0123456789abcdef0123",
    "GENSERVE_ADMIN_TOKEN": "adm-token-value-0123456789abcdef0123",
    "GENSERVE_DATABASE_URL": "postgresql+psycopg2://genserve:db-password-42@db.internal/gs",
    "GENSERVE_S3_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID",
    "GENSERVE_S3_SECRET_ACCESS_KEY": "s3-secret-access-key-value",
    "GENSERVE_STORAGE_BACKEND": "s3",
}
SECRET_VALUES = ("svc-token-value", "adm-token-value", "db-password-42", "AKIAEXAMPLEKEYID", "s3-secret-access-key")


def _deployed(tmp_path: Path, **extra: str) -> Any:
    return load_settings(env={**SECRETS, "GENSERVE_DATA_DIR": str(tmp_path / "data"), **extra})


# ------------------------------------------------------------------------------------ finding 2


def test_handoff_holds_no_secret_and_child_reads_them_from_a_0600_file(tmp_path: Path):
    settings = _deployed(tmp_path)
    env = settings.to_env(env={})  # the parent's environment names none of them: a file is written
    text = json.dumps(env)
    for value in SECRET_VALUES:
        assert value not in text
    handoff = json.loads(env["GENSERVE_SETTINGS_JSON"])
    path = Path(handoff["secrets_file"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    child = load_settings(env=env)
    assert child == settings
    assert child.database_url == SECRETS["GENSERVE_DATABASE_URL"]


def test_handoff_uses_the_environment_by_name_when_it_already_holds_the_secrets(tmp_path: Path):
    settings = _deployed(tmp_path)
    handoff = settings_handoff(settings, env=SECRETS)
    assert handoff["secrets_file"] is None
    assert not (tmp_path / "data" / "run").exists()
    assert "auth.service_token" in handoff["secrets"] and "database.url" in handoff["secrets"]
    # a replica on another node: the deployment's secret gives it the same variables
    assert settings_from_handoff(handoff, env=SECRETS) == settings


def test_child_without_the_secrets_refuses_instead_of_using_defaults(tmp_path: Path):
    handoff = settings_handoff(_deployed(tmp_path), env=SECRETS)
    with pytest.raises(ConfigError) as err:
        settings_from_handoff(handoff, env={})
    assert err.value.code == "secrets_missing"
    assert "database.url" in err.value.message


def test_public_dump_and_logs_carry_no_secret(tmp_path: Path):
    text = json.dumps(public_dump(_deployed(tmp_path)))
    for value in SECRET_VALUES:
        assert value not in text


def test_operator_secrets_file_must_be_private(tmp_path: Path):
    file = tmp_path / "secrets.yaml"
    file.write_text("auth:\n  service_token: from-the-file-0123456789abcdef0123\n")
    os.chmod(file, 0o644)
    with pytest.raises(ConfigError) as err:
        load_settings(env={SECRETS_FILE_ENV: str(file), "GENSERVE_DATA_DIR": str(tmp_path)})
    assert err.value.code == "secrets_file_insecure"
    os.chmod(file, 0o600)
    s = load_settings(env={SECRETS_FILE_ENV: str(file), "GENSERVE_DATA_DIR": str(tmp_path)})
    assert s.auth.service_token.get_secret_value() == "from-the-file-0123456789abcdef0123"


def test_training_job_submission_carries_no_secret(tmp_path: Path):
    from training.ray_jobs import RayJobLauncher

    submitted: list[dict] = []

    class Client:
        def submit_job(self, **job: Any) -> str:
            submitted.append(job)
            return job["submission_id"]

    launcher = RayJobLauncher(_deployed(tmp_path))
    launcher._client = Client()
    launcher._gpus = lambda: 0.0  # type: ignore[method-assign]
    launcher.submit("0" * 32, 1)
    text = json.dumps(submitted, default=str)
    for value in SECRET_VALUES:
        assert value not in text
    child = load_settings(env=submitted[0]["runtime_env"]["env_vars"])
    assert child.auth.service_token.get_secret_value() == SECRETS["GENSERVE_SERVICE_TOKEN"]


def test_serve_deployment_arguments_carry_no_secret(tmp_path: Path):
    from genserve.app import build_app

    settings = _deployed(tmp_path)
    app = build_app(settings, {"applications": [{"name": "genserve", "deployments": []}]})
    args = app._bound_deployment.init_args  # (settings handoff, workers)
    text = json.dumps(args[0], default=str)
    for value in SECRET_VALUES:
        assert value not in text
    assert settings_from_handoff(args[0], env={}) == settings


# ------------------------------------------------------------------------------------ finding 1


@pytest.mark.parametrize("extra", [
    {},  # PostgreSQL + S3
    {"GENSERVE_DATABASE_URL": "", "GENSERVE_STORAGE_BACKEND": "local", "GENSERVE_HOST": "0.0.0.0"},
    {"GENSERVE_DATABASE_URL": "", "GENSERVE_STORAGE_BACKEND": "local", "GENSERVE_RAY_ADDRESS": "ray://head:10001"},
])
def test_non_local_configuration_with_default_tokens_is_refused(tmp_path: Path, extra: dict[str, str]):
    env = {k: v for k, v in {**SECRETS, **extra}.items() if v and "TOKEN" not in k}
    settings = load_settings(env={**env, "GENSERVE_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        check_deployment(settings)
    assert err.value.code == "insecure_deployment"
    assert "GENSERVE_SERVICE_TOKEN" in err.value.message and "GENSERVE_ADMIN_TOKEN" in err.value.message


def test_short_or_shared_tokens_are_refused_and_strong_ones_start(tmp_path: Path):
    base = {**SECRETS, "GENSERVE_DATA_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match="shorter"):
        check_deployment(load_settings(env={**base, "GENSERVE_SERVICE_TOKEN": "hunter2"}))
    with pytest.raises(ConfigError, match="same"):
        check_deployment(load_settings(env={**base, "GENSERVE_SERVICE_TOKEN": STRONG_ADMIN,
                                            "GENSERVE_ADMIN_TOKEN": STRONG_ADMIN}))
    check_deployment(load_settings(env={**base, "GENSERVE_SERVICE_TOKEN": STRONG_SERVICE,
                                        "GENSERVE_ADMIN_TOKEN": STRONG_ADMIN}))


def test_local_defaults_still_start(tmp_path: Path):
    check_deployment(load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path)}))


def test_genserve_serve_exits_non_zero_with_a_clear_message(tmp_path: Path):
    from genserve.cli import app

    env = {"GENSERVE_DATA_DIR": str(tmp_path), "GENSERVE_HOST": "0.0.0.0", "GENSERVE_SETTINGS_JSON": None}
    result = CliRunner().invoke(app, ["serve", "--no-build-models", "--json"], env=env)
    assert result.exit_code != 0
    body = json.loads(result.stdout.strip().splitlines()[-1])
    assert body["error"]["code"] == "insecure_deployment"
    assert not (tmp_path / "genserve.db").exists()  # refused before anything was created


def test_serve_deploy_app_builder_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from genserve.app import app_builder

    monkeypatch.delenv("GENSERVE_SETTINGS_JSON", raising=False)
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GENSERVE_STORAGE_BACKEND", "s3")
    with pytest.raises(ConfigError) as err:
        app_builder({})
    assert err.value.code == "insecure_deployment"

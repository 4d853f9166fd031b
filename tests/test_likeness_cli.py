"""`genserve likeness add|check|list`: exit codes and --json output."""

from __future__ import annotations

import json

import pytest
from likeness_fixtures import random_lora, rescale, sd1_modules, to_kohya, to_peft, write
from typer.testing import CliRunner

from genserve.cli import app


@pytest.fixture
def cli(db, settings):
    runner = CliRunner()
    env = {"GENSERVE_DATA_DIR": str(settings.data_dir)}
    return lambda *args: runner.invoke(app, list(args), env=env)


def test_add_check_list(cli, tmp_path):
    base = random_lora(sd1_modules(), seed=7)
    blocked = write(tmp_path / "jane.safetensors", to_kohya(base))
    variant = write(tmp_path / "jane_peft.safetensors", to_peft(rescale(base, 3.0)))
    clean = write(tmp_path / "other.safetensors", to_kohya(random_lora(sd1_modules(), seed=8)))

    res = cli("likeness", "check", str(blocked), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["blocked"] is False

    res = cli("likeness", "add", str(blocked), "--person", "Jane Roe", "--reason", "no consent", "--source", "td_1",
              "--json")
    assert res.exit_code == 0, res.output
    entry = json.loads(res.stdout)
    assert entry["person"] == "Jane Roe" and entry["fingerprint_modules"] == len(sd1_modules())
    [audit_row] = json.loads(cli("audit", "log", "--kind", "likeness", "--json").stdout)["rows"]
    assert audit_row["action"] == "add" and audit_row["details"]["entry_id"] == entry["id"]
    assert audit_row["subject_hashes"] == [entry["sha256"]]

    res = cli("likeness", "check", str(blocked), "--json")
    assert res.exit_code == 3
    out = json.loads(res.stdout)
    assert out["blocked"] is True
    assert (out["match"]["entry_id"], out["match"]["method"]) == (entry["id"], "sha256")

    res = cli("likeness", "check", str(variant), "--json")
    assert res.exit_code == 3
    assert json.loads(res.stdout)["match"]["method"] == "fingerprint"

    res = cli("likeness", "check", str(variant))  # human output, same exit code
    assert res.exit_code == 3 and "BLOCKED" in res.output

    assert cli("likeness", "check", str(clean), "--json").exit_code == 0

    res = cli("likeness", "list", "--json")
    assert res.exit_code == 0
    [listed] = json.loads(res.stdout)["entries"]
    assert (listed["id"], listed["source"]) == (entry["id"], "td_1")


def test_bad_file_is_an_error_not_a_pass(cli, tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 a zip-pickle checkpoint")
    res = cli("likeness", "check", str(bad), "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout)["error"]["code"] == "not_safetensors"
    res = cli("likeness", "add", str(bad), "--person", "Jane Roe", "--reason", "x", "--json")
    assert res.exit_code == 1
    assert json.loads(cli("likeness", "list", "--json").stdout)["entries"] == []


def test_check_takes_a_request_of_several_files_with_strengths(cli, tmp_path):
    from likeness_fixtures import add_loras, keep_modules

    base = random_lora(sd1_modules(), seed=7)
    blocked = write(tmp_path / "jane.safetensors", to_kohya(base))
    entry = json.loads(cli("likeness", "add", str(blocked), "--person", "Jane Roe", "--reason", "r", "--json").stdout)
    # (blocked + U) at +1 and U at -1: neither file matches alone, the request does
    u = rescale(random_lora(sd1_modules(), seed=9), 3.0)
    plus = write(tmp_path / "plus.safetensors", to_kohya(add_loras(base, u)))
    minus = write(tmp_path / "minus.safetensors", to_kohya(u))
    for alone in (plus, minus):
        assert cli("likeness", "check", str(alone), "--json").exit_code == 0

    res = cli("likeness", "check", str(plus), str(minus), "--strength", "1", "--strength", "-1", "--json")
    assert res.exit_code == 3, res.output
    out = json.loads(res.stdout)
    assert out["blocked"] is True
    assert (out["match"]["entry_id"], out["match"]["method"], out["match"]["parts"]) == (entry["id"], "combined", [0, 1])
    assert [f["strength"] for f in out["files"]] == [1.0, -1.0]
    assert [f["kind"] for f in out["files"]] == ["lora", "lora"]

    # the same pair at +1 / +1 adds U twice instead of cancelling it: not the blocked LoRA
    res = cli("likeness", "check", str(plus), str(minus), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["match"] is None

    res = cli("likeness", "check", str(plus), str(minus), "--strength", "1")  # one strength for two files
    assert res.exit_code == 1 and "--strength" in res.output

    half = write(tmp_path / "half.safetensors", to_kohya(keep_modules(base, lambda p: "up_blocks" not in p)))
    rest = write(tmp_path / "rest.safetensors", to_kohya(keep_modules(base, lambda p: "up_blocks" in p)))
    res = cli("likeness", "check", str(half), str(rest))
    assert res.exit_code == 3 and "BLOCKED" in res.output

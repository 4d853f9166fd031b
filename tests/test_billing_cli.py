"""`genserve buzz` through typer's CliRunner against a real SQLite database."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from genserve.cli import app
from genserve.core.db import Database


@pytest.fixture
def cli(tmp_path):
    data_dir = tmp_path / "data"
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, ["buzz", *args], env={"GENSERVE_DATA_DIR": str(data_dir)})

    assert runner.invoke(app, ["migrate", "--json"], env={"GENSERVE_DATA_DIR": str(data_dir),
                                                          "GENSERVE_SETTINGS_JSON": None}).exit_code == 0
    run.database_url = f"sqlite:///{(data_dir / 'genserve.db').resolve()}"
    return run


@pytest.mark.parametrize("args", [["balance", "42"], ["verify"], ["grant", "42", "5"]])
def test_buzz_from_another_folder_refuses_instead_of_creating_an_empty_database(tmp_path, args):
    """Run where `./.genserve` holds no database: a clear refusal, nothing created, never "0 buzz"."""
    data_dir = tmp_path / "elsewhere" / ".genserve"
    res = CliRunner().invoke(app, ["buzz", *args, "--json"], env={"GENSERVE_DATA_DIR": str(data_dir),
                                                                  "GENSERVE_SETTINGS_JSON": None})
    assert res.exit_code == 1
    error = json.loads(res.stdout)["error"]
    assert error["code"] == "database_missing" and "GENSERVE_DATA_DIR" in error["message"]
    assert not (data_dir / "genserve.db").exists()


def test_buzz_on_an_unmigrated_database_refuses(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "genserve.db").touch()
    res = CliRunner().invoke(app, ["buzz", "balance", "42", "--json"], env={"GENSERVE_DATA_DIR": str(data_dir),
                                                                          "GENSERVE_SETTINGS_JSON": None})
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "database_not_migrated"


def test_grant_balance_history_verify_json(cli):
    res = cli("grant", "42", "100", "--reason", "welcome", "--json")
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert body["entry"]["amount"] == 100 and body["balance"]["available"] == 100

    again = cli("grant", "42", "100", "--key", "k1", "--json")
    assert again.exit_code == 0
    retry = cli("grant", "user:42", "100", "--key", "k1", "--json")
    assert json.loads(retry.stdout)["entry"] == json.loads(again.stdout)["entry"]

    res = cli("balance", "42", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == {
        "account": "user:42", "posted": 200, "held": 0, "available": 200
    }
    assert json.loads(cli("balance", "mint", "--json").stdout)["posted"] == -200

    res = cli("history", "42", "--json")
    entries = json.loads(res.stdout)["entries"]
    assert [e["amount"] for e in entries] == [100, 100] and entries[1]["reason"] == "welcome"

    res = cli("verify", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
    assert cli("reap", "--json").exit_code == 0
    human = cli("balance", "42")
    assert human.exit_code == 0 and "200 available" in human.stdout


@pytest.mark.parametrize(
    "args,code",
    [
        (["grant", "42", "0"], "invalid_amount"),
        (["grant", "42", "5", "--kind", "gift"], "invalid_grant_kind"),
        (["grant", "bad id!", "5"], "invalid_account"),
        (["balance", "revenue:nope"], "account_not_found"),
    ],
)
def test_refusals_exit_non_zero_with_code(cli, args, code):
    res = cli(*args, "--json")
    assert res.exit_code != 0
    assert json.loads(res.stdout)["error"]["code"] == code


def test_verify_fails_on_a_tampered_entry(cli):
    assert cli("grant", "7", "50", "--json").exit_code == 0
    db = Database(cli.database_url)
    with db.engine.begin() as c:
        # Entries are immutable: the trigger must be dropped before raw SQL can edit one.
        c.execute(text("DROP TRIGGER ledger_entries_no_update"))
        c.execute(text("UPDATE ledger_entries SET amount = 60 WHERE account_id = 'user:7'"))
    db.dispose()
    res = cli("verify", "--json")
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert report["ok"] is False and any("user:7" in p for p in report["problems"])
    assert any("entries sum to 10" in p for p in report["problems"])
    human = cli("verify")
    assert human.exit_code == 1 and "user:7" in human.output


def test_allowance_once_per_day_and_earnings(cli):
    first = cli("allowance", "77", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["granted"] > 0
    second = json.loads(cli("allowance", "77", "--json").stdout)
    assert second["granted"] == 0 and second["already_claimed"]
    res = cli("earnings", "77", "--since", "2026-01-01", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["total"] == 0
    missing = cli("receipt", "0" * 32, "--json")
    assert missing.exit_code != 0

"""Takedown requests end to end: request, moderator decision, blocklist + name list + audit rows."""

from __future__ import annotations

import json

import pytest
from likeness_fixtures import add_noise, random_lora, sd1_modules, to_diffusers, to_kohya, write

from safety.audit_log import AuditLog
from safety.errors import NotSafetensors
from safety.likeness import LikenessBlocklist
from safety.store import person_names
from safety.takedowns import TakedownNotFound, TakedownNotPending, Takedowns


@pytest.fixture
def parts(db):
    audit = AuditLog(db.session)
    blocklist = LikenessBlocklist(db.session)
    return Takedowns(db.session, blocklist, audit), blocklist, audit


def test_request_approve_blocks_files_and_name(db, parts, tmp_path):
    takedowns, blocklist, audit = parts
    lora_a = random_lora(sd1_modules(), seed=1)
    file_a = write(tmp_path / "a.safetensors", to_kohya(lora_a))
    file_b = write(tmp_path / "b.safetensors", to_kohya(random_lora(sd1_modules(), seed=2)))
    td = takedowns.request("  Jane   Roe ", contact="jane@example.org", resource_ids=["res_a", "res_b"],
                           reason="my face without consent", requested_by="support")
    assert td.status == "requested" and td.person == "Jane   Roe"
    assert blocklist.check(file_a) is None

    done = takedowns.approve(td.id, "mod-kim", {"res_a": file_a, "res_b": file_b.read_bytes()}, note="verified ID")
    assert (done.status, done.moderator, done.decision_note, len(done.entry_ids)) == ("approved", "mod-kim", "verified ID", 2)
    assert done.decided_at is not None

    entries = {e.id: e for e in blocklist.list()}
    assert {entries[i].resource_id for i in done.entry_ids} == {"res_a", "res_b"}
    assert all(entries[i].source == td.id and entries[i].created_by == "mod-kim" for i in done.entry_ids)
    assert blocklist.check(file_a).method == "sha256"
    # A re-upload converted and slightly perturbed is still refused, by its weights.
    reupload = write(tmp_path / "reupload.safetensors", to_diffusers(add_noise(lora_a, 0.01)))
    hit = blocklist.check(reupload)
    assert hit is not None and hit.method == "fingerprint" and hit.source == td.id and hit.person == "Jane   Roe"

    with db.session() as s:
        assert person_names(s) == ["Jane Roe"]
    rows = audit.query(kind="takedown")
    assert [r.action for r in rows] == ["approved", "requested"]
    assert rows[0].details["entry_ids"] == done.entry_ids and rows[0].user_id == "mod-kim"
    assert audit.verify().ok

    with pytest.raises(TakedownNotPending):
        takedowns.approve(td.id, "mod-kim", [file_a])
    with pytest.raises(TakedownNotPending):
        takedowns.deny(td.id, "mod-kim")


def test_second_takedown_for_same_person_keeps_one_name(db, parts, tmp_path):
    takedowns, _, _ = parts
    for seed in (1, 2):
        td = takedowns.request("Jane Roe")
        takedowns.approve(td.id, "mod", [write(tmp_path / f"{seed}.safetensors", to_kohya(random_lora(sd1_modules(), seed=seed)))])
    with db.session() as s:
        assert person_names(s) == ["Jane Roe"]


def test_deny_changes_nothing_but_the_status(db, parts):
    takedowns, blocklist, audit = parts
    td = takedowns.request("John Doe", resource_ids=["res_x"])
    denied = takedowns.deny(td.id, "mod-kim", note="parody of a fictional character")
    assert denied.status == "denied" and takedowns.get(td.id).decision_note == "parody of a fictional character"
    assert blocklist.list() == []
    with db.session() as s:
        assert person_names(s) == []
    assert [r.action for r in audit.query(kind="takedown")] == ["denied", "requested"]
    assert [t.id for t in takedowns.list("denied")] == [td.id] and takedowns.list("requested") == []


def test_bad_file_leaves_the_request_pending(db, parts, tmp_path):
    takedowns, blocklist, _ = parts
    good = write(tmp_path / "good.safetensors", to_kohya(random_lora(sd1_modules(), seed=1)))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    td = takedowns.request("Jane Roe")
    with pytest.raises(NotSafetensors):
        takedowns.approve(td.id, "mod", [good, bad])
    assert takedowns.get(td.id).status == "requested"
    assert blocklist.list() == []
    with db.session() as s:
        assert person_names(s) == []
    with pytest.raises(TakedownNotFound):
        takedowns.approve("td_missing", "mod", [good])


def test_cli_takedown_flow(db, settings, tmp_path):
    from typer.testing import CliRunner

    from genserve.cli import app

    runner = CliRunner()
    env = {"GENSERVE_DATA_DIR": str(settings.data_dir)}
    lora = write(tmp_path / "a.safetensors", to_kohya(random_lora(sd1_modules(), seed=4)))

    res = runner.invoke(app, ["takedown", "request", "--person", "Jane Roe", "--resource-id", "res_a", "--json"], env=env)
    assert res.exit_code == 0, res.output
    td_id = json.loads(res.stdout)["id"]

    res = runner.invoke(app, ["takedown", "approve", td_id, "--moderator", "mod", "--file", str(lora),
                              "--for-resource", "res_a", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "approved"

    res = runner.invoke(app, ["likeness", "check", str(lora), "--json"], env=env)
    assert res.exit_code == 3
    assert json.loads(res.stdout)["match"]["source"] == td_id

    res = runner.invoke(app, ["takedown", "approve", td_id, "--moderator", "mod", "--json"], env=env)
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "takedown_not_pending"
    res = runner.invoke(app, ["takedown", "deny", "td_nope", "--moderator", "mod", "--json"], env=env)
    assert res.exit_code == 1 and json.loads(res.stdout)["error"]["code"] == "takedown_not_found"

    res = runner.invoke(app, ["takedown", "list", "--status", "approved", "--json"], env=env)
    assert [t["id"] for t in json.loads(res.stdout)["takedowns"]] == [td_id]

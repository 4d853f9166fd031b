"""The audit log's hash chain: verifies, names the first tampered row, stays valid under concurrent appends."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from safety.audit_log import GENESIS_HASH, AuditLog
from safety.verdict import Action, Reason, Verdict


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request):
    return request.getfixturevalue("db" if request.param == "sqlite" else "pg_db")


def _fill(log: AuditLog, n: int = 5) -> None:
    for i in range(n):
        log.append("image", "withhold" if i % 2 else "allow", rules=[f"nsfw.level.{i}"], subject=f"{i:064x}",
                   request_id=f"req-{i}", job_id=f"job-{i % 2}", user_id="u1",
                   details={"score": 0.5 + i / 10, "labels": ["a", "b"], "nested": {"n": i}})


def test_chain_verifies_and_reads_back(database):
    log = AuditLog(database.session)
    assert log.verify().ok and log.verify().checked == 0
    _fill(log)
    verdict = Verdict(Action.block, (Reason("prompt.minor_sexual", "minor + sexual", field="prompt", span=(0, 4)),),
                      mature=True, minor_signal=True, tags=frozenset({"minor"}))
    rec = log.append_verdict(verdict, subject="ab" * 32, request_id="req-v", job_id="job-v", user_id="u2")
    assert (rec.id, rec.action, rec.rules) == (6, "block", ["prompt.minor_sexual"])
    assert rec.details["reasons"][0]["span"] == [0, 4] and rec.details["minor_signal"] is True

    report = log.verify()
    assert report.ok and report.checked == 6 and report.head_id == 6 and report.head_hash == rec.row_hash

    rows = log.query(job_id="job-1")
    assert [r.id for r in rows] == [4, 2]  # newest first
    assert rows[0].details == {"score": 0.8, "labels": ["a", "b"], "nested": {"n": 3}}
    assert [r.id for r in log.query(kind="prompt")] == [6]
    assert [r.id for r in log.query(limit=2)] == [6, 5]
    assert [r.id for r in log.query(before_id=2)] == [1]
    first = log.query(before_id=2)[0]
    assert first.prev_hash == GENESIS_HASH


def test_edited_row_is_detected(database):
    log = AuditLog(database.session)
    _fill(log)
    with database.transaction() as s:
        s.execute(text("UPDATE safety_audit_log SET action = 'tampered' WHERE id = 3"))
    report = log.verify()
    assert (report.ok, report.first_bad_id, report.problem, report.checked) == (False, 3, "row_hash_mismatch", 2)


def test_edited_row_with_recomputed_hash_breaks_the_next_link(database):
    """Someone who edits a row and fixes its own hash still breaks the chain at the following row."""
    from safety.audit_log import row_digest
    from safety.store import AuditRow

    log = AuditLog(database.session)
    _fill(log)
    with database.transaction() as s:
        row = s.get(AuditRow, 2)
        row.action = "tampered"
        row.row_hash = row_digest(id=row.id, ts=row.ts, kind=row.kind, action=row.action, rules=row.rules,
                                  subject_hashes=row.subject_hashes, request_id=row.request_id, job_id=row.job_id,
                                  user_id=row.user_id, details=row.details, prev_hash=row.prev_hash)
    report = log.verify()
    assert (report.ok, report.first_bad_id, report.problem) == (False, 3, "prev_hash_mismatch")


def test_deleted_row_is_detected(database):
    log = AuditLog(database.session)
    _fill(log)
    with database.transaction() as s:
        s.execute(text("DELETE FROM safety_audit_log WHERE id = 2"))
    report = log.verify()
    assert (report.ok, report.first_bad_id, report.problem) == (False, 3, "id_gap")

    with database.transaction() as s:
        s.execute(text("DELETE FROM safety_audit_log WHERE id = 1"))
    assert log.verify().first_bad_id == 3  # the chain no longer starts at row 1


def test_reordered_rows_are_detected(database):
    log = AuditLog(database.session)
    _fill(log)
    with database.transaction() as s:  # swap rows 2 and 3
        s.execute(text("UPDATE safety_audit_log SET id = -2 WHERE id = 2"))
        s.execute(text("UPDATE safety_audit_log SET id = 2 WHERE id = 3"))
        s.execute(text("UPDATE safety_audit_log SET id = 3 WHERE id = -2"))
    report = log.verify()
    assert (report.ok, report.first_bad_id, report.problem) == (False, 2, "row_hash_mismatch")


def test_concurrent_appends_keep_one_chain(database):
    log = AuditLog(database.session)
    threads, per_thread = 6, 8
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                log.append("prompt", "allow", rules=[], request_id=f"r{t}-{i}", details={"t": t, "i": i})
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    report = log.verify()
    assert report.ok and report.checked == threads * per_thread
    assert len({r.request_id for r in log.query(limit=1000)}) == threads * per_thread


def test_append_joins_the_callers_transaction(database):
    log = AuditLog(database.session)
    with pytest.raises(RuntimeError), database.transaction() as s:
        log.append("takedown", "approved", session=s)
        raise RuntimeError("the caller's work failed")
    assert log.verify().checked == 0  # rolled back with it
    with database.transaction() as s:
        log.append("takedown", "approved", session=s)
    assert log.verify().checked == 1


def test_details_must_be_json(db):
    from safety.errors import SafetyError

    with pytest.raises(SafetyError):
        AuditLog(db.session).append("image", "allow", details={"score": float("nan")})


def test_cli_verify_and_log(db, settings):
    import json

    from typer.testing import CliRunner

    from genserve.cli import app

    log = AuditLog(db.session)
    _fill(log, 3)
    runner = CliRunner()
    env = {"GENSERVE_DATA_DIR": str(settings.data_dir)}
    res = runner.invoke(app, ["audit", "verify", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["checked"] == 3

    res = runner.invoke(app, ["audit", "log", "--job-id", "job-0", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in json.loads(res.stdout)["rows"]] == [3, 1]

    with db.transaction() as s:
        s.execute(text("UPDATE safety_audit_log SET details = '{}' WHERE id = 2"))
    res = runner.invoke(app, ["audit", "verify", "--json"], env=env)
    assert res.exit_code != 0
    assert json.loads(res.stdout)["first_bad_id"] == 2


def test_decisions_about_a_user_are_counted_from_a_point_in_time(database):
    """What the input-strike rule asks of the log, on both databases (timestamps compare as instants)."""
    import datetime as dt

    log = AuditLog(database.session)
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    for action in ("block", "block", "allow"):
        log.append("input_image", action, user_id="striker")
    log.append("input_image", "block", user_id="someone-else")
    log.append("prompt", "block", user_id="striker")
    assert log.count_since(before, kind="input_image", action="block", user_id="striker") == 2
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    assert log.count_since(later, kind="input_image", action="block", user_id="striker") == 0

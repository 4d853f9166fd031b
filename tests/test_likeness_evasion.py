"""The evasion suite (tests/likeness_evasions.py) run through the blocklist as a request would be checked:
every full-effect disguise and every split is caught, partial copies keeping most of the effect are caught,
and no unrelated LoRA is blocked."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from likeness_evasions import build_suite, locon_suite, run

from safety.likeness import LikenessBlocklist

SUITES = ["sd1", "sdxl", "locon"]


@dataclass
class Checked:
    """One suite's blocked files in a fresh blocklist, and every case checked as a request once."""

    blocklist: LikenessBlocklist
    entry_ids: list[int]
    outcomes: dict[str, tuple]  # case name -> (case, match or None, the entry it must match or None)
    prepared: dict[str, list]  # case name -> its files' PreparedResource


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """name -> Checked, built on first use (building and checking a suite takes seconds; do it once)."""
    from genserve.core.db import Database

    cache: dict[str, Checked] = {}
    databases = []

    def get(name: str) -> Checked:
        if name not in cache:
            suite = locon_suite() if name == "locon" else build_suite(name)
            db = Database(f"sqlite:///{tmp_path_factory.mktemp(name)}/likeness.db")
            db.migrate()
            databases.append(db)
            blocklist = LikenessBlocklist(db.session)
            entry_ids = [blocklist.add(data, f"person {i}", "likeness") for i, data in enumerate(suite.blocked)]
            outcomes, prepared = {}, {}
            for case in suite.cases:
                prepared[case.name] = [blocklist.prepare(data) for data, _ in case.files]
                hit = blocklist.check_combined(list(zip(prepared[case.name], [s for _, s in case.files], strict=True)))
                outcomes[case.name] = (case, hit, None if case.target is None else entry_ids[case.target])
            cache[name] = Checked(blocklist, entry_ids, outcomes, prepared)
        return cache[name]

    yield get
    for db in databases:
        db.dispose()


@pytest.mark.parametrize("name", SUITES)
def test_every_full_effect_disguise_of_a_blocked_lora_is_caught(checked, name):
    blocklist, outcomes = checked(name).blocklist, checked(name).outcomes
    disguises = {n: (case, hit, want) for n, (case, hit, want) in outcomes.items() if case.kind == "disguise"}
    assert len(disguises) >= 5
    missed = {n: hit for n, (_, hit, want) in disguises.items() if hit is None or hit.entry_id != want}
    assert not missed, f"disguises not caught: {missed}"
    # and by weights, not by luck of a hash (a pure key rename can leave the tensor payload as it was):
    # a disguise keeps (nearly) all of the blocked effect
    for n, (_case, _, want) in disguises.items():
        by_weights = blocklist.match_fingerprint(checked(name).prepared[n][0].fingerprint)
        assert by_weights.entry_id == want and by_weights.similarity > 0.9, (n, by_weights)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_a_blocked_lora_split_across_files_is_caught_as_a_request(checked, name):
    blocklist, outcomes = checked(name).blocklist, checked(name).outcomes
    splits = {n: (case, hit, want) for n, (case, hit, want) in outcomes.items() if case.kind == "split"}
    assert len(splits) >= 6
    for n, (case, hit, want) in splits.items():
        assert hit is not None and hit.entry_id == want, f"split {n!r} not caught"
        assert hit.method == "combined" and hit.parts == tuple(range(len(case.files))), (n, hit)
    # every file of the (blocked + U) / U pair passes alone: only the request-level check stops it
    pair = splits["(blocked + U) at +1, U at -1"][0]
    assert all(blocklist.check(data) is None for data, _ in pair.files)


def test_a_blocked_lora_split_by_modules_is_caught_as_a_pair(checked):
    blocklist, outcomes = checked("sd1").blocklist, checked("sd1").outcomes
    case, hit, want = outcomes["by modules (alternate modules)"]
    alone = [blocklist.check(data) for data, _ in case.files]
    # each half alone reproduces only its share of the blocked effect (whether or not that is enough) ...
    assert all(a is None or a.similarity < 0.7 for a in alone)
    # ... the pair as one request reproduces all of it
    assert (hit.entry_id, hit.method) == (want, "combined") and hit.similarity == pytest.approx(1.0, abs=1e-3)
    # split in three, every file passes alone: only the request-level check stops it
    case, hit, want = outcomes["three files: thirds of the modules, strengths 2 / 1 / -1"]
    assert [blocklist.check(data) for data, _ in case.files] == [None, None, None]
    assert hit.entry_id == want and hit.similarity == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_partial_copies_keeping_most_of_the_effect_are_caught(checked, name):
    outcomes = checked(name).outcomes
    partial = {n: (case, hit, want) for n, (case, hit, want) in outcomes.items() if case.kind == "partial"}
    assert {"three quarters of the modules", "rank truncation 8 -> 2", "50% noise",
            "self-attention only (of an attention-only LoRA)"} <= set(partial)
    for n, (case, hit, want) in partial.items():
        assert hit is not None and hit.entry_id == want, f"partial copy {n!r} (kept {case.kept}) not caught"
        assert hit.similarity < 0.99  # a partial copy scores the share it keeps, not a full match
    # the score tracks what is kept: three quarters of the modules score about three quarters
    case, hit, _ = partial["three quarters of the modules"]
    assert hit.similarity == pytest.approx(case.kept, abs=0.06)


@pytest.mark.parametrize("name", SUITES)
def test_no_unrelated_lora_is_blocked(checked, name):
    blocklist, outcomes = checked(name).blocklist, checked(name).outcomes
    unrelated = {n: hit for n, (case, hit, _) in outcomes.items() if case.kind == "unrelated"}
    assert len(unrelated) >= (1 if name == "locon" else 20)
    assert {n: h for n, h in unrelated.items() if h is not None} == {}
    # and they are far from the line, not just under it
    worst = max(float(blocklist._index.fp.scores([p.fingerprint])[:, 0].max())
                for n, (case, _, _) in outcomes.items() if case.kind == "unrelated" for p in checked(name).prepared[n])
    assert worst < blocklist.config.containment_threshold / 2


def test_run_counts_caught_and_missed_per_kind(checked):
    blocklist = checked("locon").blocklist
    figures = run(locon_suite(), lambda files: blocklist.check_combined([(blocklist.prepare(d), s) for d, s in files]))
    assert figures["disguise"]["caught"] == figures["disguise"]["total"] == 5
    assert figures["unrelated"] == {"caught": 0, "total": 1, "missed": ["another LoCon"], "caught_names": []}

"""Training jobs end to end in one process: safety gate, review and denial, holds and charges,
the job runner (export, registration, likeness blocklist), cancellation and reconciliation.

The job attempts run here through `JobRunner` instead of as Ray Jobs (the Ray path has its own
test in test_training_ray.py); `Launcher` stands in for the Ray Job server.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load
from training_support import available, fund, register_base_models, toy_zip, training_settings

from genserve.billing.errors import InsufficientBuzz
from genserve.core.db import Database
from genserve.core.errors import Conflict, InvalidRequest, SafetyBlocked
from safety.image_scan import ImageScanner, ScannerOutput
from safety.levels import NsfwLevel
from safety.store import AuditRow
from training.deps import TrainingDeps
from training.ray_jobs import JobState
from training.records import TrainingNotFound, utcnow
from training.run import JobRunner
from training.service import Submission, TrainingService

SMALL = {"epochs": 2, "repeats": 1, "batch_size": 2, "network_dim": 4, "network_alpha": 2, "unet_lr": 1e-2,
         "lr_scheduler": "constant", "gradient_checkpointing": False, "seed": 3}


class Launcher:
    """Stands in for the Ray Job server: records submissions; states are set by the test."""

    def __init__(self):
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.states: dict[str, JobState] = {}

    @staticmethod
    def submission_id(training_id: str, attempt: int) -> str:
        return f"test-{training_id}-{attempt}"

    def submit(self, training_id: str, attempt: int) -> None:
        sid = self.submission_id(training_id, attempt)
        self.submitted.append(sid)
        self.states[sid] = JobState.pending

    def state(self, sid: str) -> JobState:
        return self.states.get(sid, JobState.missing)

    def stop(self, sid: str) -> None:
        self.stopped.append(sid)
        self.states[sid] = JobState.stopped


class StubScanner:
    """NudeNet cannot be shown a nude image or a child offline: this scanner says what the test needs."""

    name = "stub"

    def __init__(self, level: NsfwLevel = NsfwLevel.PG, minor: bool = False):
        self.level, self.minor = level, minor

    def scan(self, image: Image.Image) -> ScannerOutput:
        return ScannerOutput(level=self.level, minor_signal=self.minor)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_service(tmp_path: Path, tiny_models):
    made = []

    def make(scanner: StubScanner | None = None) -> TrainingService:
        settings = training_settings(tmp_path)
        db = Database.from_settings(settings)
        db.migrate()
        deps = TrainingDeps.from_settings(settings, db, scanner=ImageScanner([scanner]) if scanner else None)
        register_base_models(deps, tiny_models)
        fund(deps, "alice", 1000)
        service = TrainingService(deps, launcher=Launcher())
        made.append(db)
        return service

    yield make
    for db in made:
        db.dispose()


def audit_actions(service: TrainingService, training_id: str) -> list[tuple[str, str]]:
    with service.deps.db.session() as s:
        rows = s.query(AuditRow).filter(AuditRow.job_id == training_id).order_by(AuditRow.id).all()
        return [(r.kind, r.action) for r in rows]


def test_flagged_dataset_waits_in_review_and_denial_refunds(tmp_path: Path, make_service) -> None:
    service = make_service()
    deps = service.deps
    zip_path = toy_zip(tmp_path / "flagged.zip", captions={0: "a young girl, smiling", 1: "a red square"})
    row = service.submit("alice", zip_path, Submission("sd1", real_person=False, params=SMALL))
    assert row.status == "review"
    assert row.safety["verdict"]["rules"] == ["dataset.minor_signal"]
    assert row.quote_total == math.ceil(row.total_steps * 200 / 1000) + 2 * 10
    assert available(deps, "alice") == 1000 - row.quote_total  # held, not charged
    assert service.launcher.submitted == []  # nothing trains before a moderator decides

    denied = service.deny(row.id, reason="minors")
    assert (denied.status, denied.charged, denied.error_code) == ("denied", 0, "dataset_denied")
    assert available(deps, "alice") == 1000
    assert deps.ledger.balance("user:alice").held == 0
    assert audit_actions(service, row.id) == [("training_dataset", "review"), ("training_dataset", "deny")]
    with pytest.raises(Conflict):
        service.approve(row.id)

    # approval launches the job
    again = service.submit("alice", zip_path, Submission("sd1", real_person=False, params=SMALL))
    approved = service.approve(again.id)
    assert approved.status == "queued" and approved.attempts == 1
    assert service.launcher.submitted == [approved.ray_job_id]


@pytest.mark.parametrize(("captions", "scanner", "real_person", "rules"), [
    ({0: "nude young girl"}, None, False, ["dataset.minor_in_mature", "dataset.caption_blocked"]),
    ({0: "a red square"}, StubScanner(NsfwLevel.R, minor=True), False, ["dataset.minor_in_mature"]),
    ({0: "a red square"}, StubScanner(NsfwLevel.X), True, ["dataset.real_person_mature"]),
])
def test_blocked_datasets_cost_nothing_and_leave_nothing(tmp_path: Path, make_service, captions, scanner,
                                                         real_person, rules) -> None:
    service = make_service(scanner)
    zip_path = toy_zip(tmp_path / "bad.zip", captions=captions)
    with pytest.raises(SafetyBlocked) as err:
        service.submit("alice", zip_path, Submission("sd1", real_person=real_person, name="Jane Example",
                                                     params=SMALL))
    assert err.value.code == "dataset_blocked" and err.value.details["rules"] == rules
    assert available(service.deps, "alice") == 1000
    assert service.list() == []
    assert list(service.deps.store.list("trainings/")) == []


def test_refusals_before_the_hold(tmp_path: Path, make_service) -> None:
    service = make_service()
    zip_path = toy_zip(tmp_path / "ok.zip")
    with pytest.raises(InvalidRequest) as err:
        service.submit("alice", zip_path, Submission("sd1", real_person=False, params={"epochs": 999}))
    assert err.value.code == "invalid_training_params"
    with pytest.raises(InvalidRequest) as err:
        service.submit("alice", zip_path, Submission("sd3", real_person=False))
    assert err.value.code == "unknown_family"
    with pytest.raises(InvalidRequest) as err:
        service.submit("alice", zip_path, Submission("sd1", real_person=True, params=SMALL))
    assert err.value.code == "person_required"
    with pytest.raises(InsufficientBuzz):
        service.submit("bob", zip_path, Submission("sd1", real_person=False, params=SMALL))
    assert service.list() == [] and available(service.deps, "alice") == 1000


def test_job_exports_registers_blocklists_and_charges_the_steps_run(tmp_path: Path, make_service) -> None:
    service = make_service()
    deps = service.deps
    row = service.submit("alice", toy_zip(tmp_path / "jane.zip"),
                         Submission("sd1", real_person=True, name="jane-lora", person="Jane Example",
                                    trigger_words=("janex",), params=SMALL))
    assert (row.status, row.total_steps, row.epochs) == ("queued", 4, 2)
    assert JobRunner(deps, row.id, row.ray_job_id).run() == 0

    done = service.get(row.id, "alice")
    assert done.status == "succeeded" and (done.step, done.epoch) == (4, 2) and done.loss is not None
    expected = math.ceil(4 * 200 / 1000) + 2 * 10  # steps run + saved epochs
    assert done.charged == done.quote_total == expected
    assert available(deps, "alice") == 1000 - expected
    assert deps.ledger.balance("user:alice").held == 0
    assert [(s["epoch"], s["index"]) for s in done.samples] == [(1, 0), (2, 0)]
    assert all(s["delivered"] and s["level"] == "PG" for s in done.samples)

    resource = deps.registry.get(done.resource_id)
    assert (resource.kind.value, resource.family.value, resource.owner_user_id) == ("lora", "sd1", "alice")
    assert resource.poi and resource.trigger_words == ["janex"] and resource.sha256 == done.output_sha256

    name, stream = service.download(row.id, "alice")  # the owner may download it ...
    data = stream.read()
    assert name == "jane-lora.safetensors" and any(k.endswith(".alpha") for k in load(data))
    match = deps.blocklist.check(data)  # ... but the generator's blocklist matches it
    assert match is not None and (match.person, match.method) == ("Jane Example", "sha256")
    assert match.source == f"training:{row.id}"
    assert [e.resource_id for e in deps.blocklist.list()] == [done.resource_id]

    with pytest.raises(TrainingNotFound):
        service.get(row.id, "mallory")


def test_cancel_between_steps_charges_the_steps_run(tmp_path: Path, make_service) -> None:
    service = make_service()
    deps = service.deps
    params = {**SMALL, "epochs": 10}
    queued = service.submit("alice", toy_zip(tmp_path / "c.zip"), Submission("sd1", real_person=False, params=params))
    canceled = service.cancel(queued.id, "alice")  # still queued: nothing ran, nothing charged
    assert (canceled.status, canceled.charged) == ("canceled", 0) and service.launcher.stopped == [queued.ray_job_id]

    row = service.submit("alice", toy_zip(tmp_path / "c.zip"), Submission("sd1", real_person=False, params=params))
    runner = threading.Thread(target=JobRunner(deps, row.id, row.ray_job_id).run)
    runner.start()
    deadline = time.monotonic() + 120
    while deps.records.get(row.id).step < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.cancel(row.id, "alice").cancel_requested
    runner.join(timeout=120)
    done = deps.records.get(row.id)
    assert done.status == "canceled" and 3 <= done.step < done.total_steps
    assert done.charged == math.ceil(done.step * 200 / 1000)  # steps only: a canceled job delivers nothing
    assert available(deps, "alice") == 1000 - done.charged
    with pytest.raises(Conflict):
        service.cancel(row.id, "alice")


def test_reconcile_resumes_dead_attempts_then_fails_with_a_full_refund(tmp_path: Path, make_service) -> None:
    service = make_service()
    deps = service.deps
    launcher = service.launcher
    row = service.submit("alice", toy_zip(tmp_path / "d.zip"), Submission("sd1", real_person=False, params=SMALL))
    held = 1000 - available(deps, "alice")
    for attempt in range(1, deps.settings.training.max_attempts):
        launcher.states[row.ray_job_id] = JobState.failed  # the process died
        row = service.get(row.id, "alice")
        assert (row.status, row.attempts) == ("queued", attempt + 1)
        assert launcher.submitted[-1] == row.ray_job_id
    launcher.states[row.ray_job_id] = JobState.failed
    row = service.get(row.id, "alice")
    assert (row.status, row.error_code, row.charged) == ("failed", "training_process_died", 0)
    assert held > 0 and available(deps, "alice") == 1000
    assert service.reconcile() == 0  # nothing left to do

    # a running attempt that stopped beating (hung) is stopped and resumed
    hung = service.submit("alice", toy_zip(tmp_path / "d.zip"), Submission("sd1", real_person=False, params=SMALL))
    deps.records.transition(hung.id, ["queued"], "running", started_at=utcnow(),
                            heartbeat_at=utcnow() - dt.timedelta(hours=1))
    launcher.states[hung.ray_job_id] = JobState.running
    relaunched = service.get(hung.id, "alice")
    assert hung.ray_job_id in launcher.stopped and (relaunched.status, relaunched.attempts) == ("queued", 2)
    service.cancel(hung.id, "alice")

    # a job whose hold was left open by a dead process is settled by the reconciler
    other = service.submit("alice", toy_zip(tmp_path / "d.zip"), Submission("sd1", real_person=False, params=SMALL))
    deps.records.transition(other.id, ["queued"], "failed", error_code="training_failed")
    assert deps.records.get(other.id).charged is None
    assert service.reconcile() == 1
    assert deps.records.get(other.id).charged == 0 and available(deps, "alice") == 1000


def test_sample_images_go_through_the_safety_policy(tmp_path: Path, make_service) -> None:
    service = make_service(StubScanner(NsfwLevel.R))  # R is over the default PG13 a sample may show
    deps = service.deps
    row = service.submit("alice", toy_zip(tmp_path / "s.zip"), Submission("sd1", real_person=False,
                                                                            params={**SMALL, "epochs": 1}))
    assert JobRunner(deps, row.id, row.ray_job_id).run() == 0
    done = deps.records.get(row.id)
    assert done.status == "succeeded"
    assert done.samples == [{"epoch": 1, "index": 0, "level": "R", "delivered": False,
                             "rules": ["nsfw_level_exceeded"]}]
    with pytest.raises(SafetyBlocked):
        service.sample(row.id, "alice", 1, 0)
    assert list(deps.store.list(f"trainings/{row.id}/samples/")) == []


def test_a_real_person_lora_is_enabled_only_with_its_blocklist_entry(tmp_path: Path, make_service, monkeypatch) -> None:
    """The LoRA is registered out of generation; a failure before its blocklist entry commits leaves it
    disabled, with no entry and nothing usable (the enable and the entry share one transaction)."""
    from genserve.resources.models import Resource
    from safety.likeness import LikenessBlocklist
    from training.run import lora_resource_id

    service = make_service()
    deps = service.deps
    row = service.submit("alice", toy_zip(tmp_path / "p.zip"),
                         Submission("sd1", real_person=True, name="p-lora", person="Pat Example", params=SMALL))
    seen = []
    real_enable = deps.registry.enable

    def enable(resource_id, *, session=None):  # noqa: ANN001, ANN202
        seen.append(session.get(Resource, resource_id).generation_enabled)
        real_enable(resource_id, session=session)
        raise RuntimeError("the database went away before the commit")

    monkeypatch.setattr(deps.registry, "enable", enable)
    JobRunner(deps, row.id, row.ray_job_id).run()
    assert seen == [False]  # published disabled
    resource = deps.registry.get(lora_resource_id(row.id))
    assert not resource.generation_enabled
    assert deps.blocklist.list() == []  # the entry rolled back with the enable
    assert isinstance(deps.blocklist, LikenessBlocklist)


def test_canceled_denied_and_failed_datasets_are_deleted_from_the_store(tmp_path: Path, make_service) -> None:
    service = make_service()
    store = service.deps.store
    queued = service.submit("alice", toy_zip(tmp_path / "q.zip"), Submission("sd1", real_person=False, params=SMALL))
    assert store.exists(queued.dataset_key)
    service.cancel(queued.id, "alice")
    assert not store.exists(queued.dataset_key)

    flagged = service.submit("alice", toy_zip(tmp_path / "f.zip", captions={0: "a young girl, smiling"}),
                             Submission("sd1", real_person=False, params=SMALL))
    assert flagged.status == "review" and store.exists(flagged.dataset_key)
    service.cancel(flagged.id, "alice")  # the owner withdraws it while in review
    assert not store.exists(flagged.dataset_key)

    refused = service.submit("alice", toy_zip(tmp_path / "r.zip", captions={0: "a young girl, smiling"}),
                             Submission("sd1", real_person=False, params=SMALL))
    service.deny(refused.id, reason="minors")
    assert not store.exists(refused.dataset_key)

    dead = service.submit("alice", toy_zip(tmp_path / "d.zip"), Submission("sd1", real_person=False, params=SMALL))
    service.deps.records.transition(dead.id, ["queued"], "failed", error_code="training_failed")
    service.reconcile()
    assert not store.exists(dead.dataset_key)
    assert available(service.deps, "alice") == 1000
    assert list(store.list("trainings/")) == []

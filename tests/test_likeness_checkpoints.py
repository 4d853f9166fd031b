"""Checkpoints on the likeness blocklist: by hashes, and by their difference from the family's base."""

from __future__ import annotations

import pytest
import torch
from likeness_fixtures import (
    drift,
    keep_modules,
    merge_into,
    random_lora,
    sd1_checkpoint,
    sd1_modules,
    to_kohya,
    write,
)

from safety.errors import SafetyError
from safety.likeness import LikenessBlocklist, checkpoint_family
from safety.likeness.fingerprint import FingerprintError

BASE = sd1_checkpoint(seed=0)


@pytest.fixture
def files(tmp_path):
    person_lora = random_lora(sd1_modules(), seed=1)
    tuned = drift(merge_into(BASE, person_lora), 0.002)  # a fine-tune that learned a person
    return {
        "base": write(tmp_path / "base.safetensors", BASE),
        "tuned": write(tmp_path / "tuned.safetensors", tuned, {"name": "jane"}),
        "tuned_renamed": write(tmp_path / "tuned2.safetensors", tuned, {"name": "totally-not-jane"}),
        "tuned_fp16": write(tmp_path / "tuned16.safetensors", {k: v.half() for k, v in tuned.items()}),
        "tuned_more": write(tmp_path / "tuned3.safetensors", drift(tuned, 0.002, seed=9)),
        "other_tune": write(tmp_path / "other.safetensors",
                            drift(merge_into(BASE, random_lora(sd1_modules(), seed=2)), 0.002, seed=3)),
        "lora": person_lora,
    }


def test_a_checkpoint_without_a_registered_base_is_refused_at_add_time(db, files):
    blocklist = LikenessBlocklist(db.session)
    with pytest.raises(SafetyError) as err:
        blocklist.add(files["tuned"], "Jane Roe", "likeness")
    assert err.value.code == "likeness_base_required"
    assert blocklist.list() == []
    # a hash-only entry is possible, but only when asked for, and it blocks the file itself
    entry_id = blocklist.add(files["tuned"], "Jane Roe", "likeness", hash_only=True)
    assert blocklist.get(entry_id).kind == "checkpoint" and blocklist.get(entry_id).fingerprint_modules == 0
    assert blocklist.check(files["tuned"]).method == "sha256"
    assert blocklist.check(files["tuned_renamed"]).method == "tensor_sha256"


def test_a_blocklisted_checkpoint_and_its_copies_cannot_be_used(db, files):
    blocklist = LikenessBlocklist(db.session)
    blocklist.register_base("sd1", files["base"])
    entry_id = blocklist.add(files["tuned"], "Jane Roe", "likeness")
    entry = blocklist.get(entry_id)
    assert entry.kind == "checkpoint" and entry.fingerprint_modules >= len(sd1_modules())

    assert blocklist.check_checkpoint(files["tuned"]).method == "sha256"
    assert blocklist.check_checkpoint(files["tuned_renamed"]).method == "tensor_sha256"
    for copy in ("tuned_fp16", "tuned_more"):
        hit = blocklist.check_checkpoint(files[copy])
        assert hit is not None and (hit.entry_id, hit.method) == (entry_id, "fingerprint"), copy
    assert blocklist.check_checkpoint(files["base"]) is None  # the base itself changes nothing
    assert blocklist.check_checkpoint(files["other_tune"]) is None


def test_a_blocked_lora_merged_into_a_checkpoint_is_caught(db, files, tmp_path):
    blocklist = LikenessBlocklist(db.session)
    blocklist.register_base("sd1", dict(BASE))  # a loaded state dict works as well as a file
    lora_entry = blocklist.add(write(tmp_path / "jane.safetensors", to_kohya(files["lora"])), "Jane Roe", "likeness")
    hit = blocklist.check(files["tuned"])
    assert hit is not None and (hit.entry_id, hit.method) == (lora_entry, "fingerprint")
    assert blocklist.check(files["other_tune"]) is None

    # half of it merged into a checkpoint, the other half as a LoRA: caught as a request
    lora = files["lora"]
    first = keep_modules(lora, lambda p: "up_blocks" in p)
    rest = keep_modules(lora, lambda p: "up_blocks" not in p)
    ckpt = blocklist.prepare(write(tmp_path / "half.safetensors", drift(merge_into(BASE, first), 0.002, seed=4)))
    part = blocklist.prepare(write(tmp_path / "rest.safetensors", to_kohya(rest)))
    hit = blocklist.check_combined([(ckpt, 1.0), (part, 1.0)])
    assert hit is not None and hit.entry_id == lora_entry and hit.similarity > 0.9


def test_a_checker_without_the_base_refuses_checkpoints_rather_than_passing_them(db, files, tmp_path):
    adder = LikenessBlocklist(db.session)
    adder.register_base("sd1", files["base"])
    adder.add(files["tuned"], "Jane Roe", "likeness")
    checker = LikenessBlocklist(db.session)  # e.g. a replica that was not given the base
    assert checker.check(files["tuned"]).method == "sha256"  # hashes need no base
    with pytest.raises(SafetyError) as err:
        checker.check(files["tuned_more"])
    assert err.value.code == "likeness_base_missing"
    # LoRAs are still checked as usual
    assert checker.check(write(tmp_path / "l.safetensors", to_kohya(random_lora(sd1_modules(), seed=5)))) is None


def test_a_checkpoint_of_another_architecture_is_not_fingerprinted_against_the_base(db, tmp_path, files):
    blocklist = LikenessBlocklist(db.session)
    blocklist.register_base("sd1", files["base"])
    alien = {f"model.diffusion_model.other.{i}.weight": torch.randn(8, 8) for i in range(10)}
    with pytest.raises(FingerprintError) as err:
        blocklist.add(write(tmp_path / "alien.safetensors", alien), "Jane Roe", "likeness", family="sd1")
    assert err.value.code == "likeness_base_mismatch"


def test_a_file_of_unknown_kind_is_refused_at_add_time(db, tmp_path):
    blocklist = LikenessBlocklist(db.session)
    odd = write(tmp_path / "odd.safetensors", {"w": torch.randn(3, 3, 3, 3)})
    with pytest.raises(SafetyError) as err:
        blocklist.add(odd, "Jane Roe", "likeness")
    assert err.value.code == "likeness_kind_unsupported"
    assert blocklist.check(odd) is None
    blocklist.add(odd, "Jane Roe", "likeness", hash_only=True)
    assert blocklist.check(odd).method == "sha256"


def test_checkpoint_family_from_key_names():
    assert checkpoint_family(list(BASE)) == "sd1"
    assert checkpoint_family(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert checkpoint_family(["down_blocks.0.resnets.0.conv1.weight"]) is None

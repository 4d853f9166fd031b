"""The semantic text-classifier slot: a tiny ONNX model built offline, used when configured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_text_classifier import build

from safety.errors import RulesInvalid, SafetyError
from safety.prompt_audit import PromptAuditor
from safety.text_classifier import ClassifierConfig, TextClassifier, hashed_features
from safety.verdict import Action

RULES_DIR = Path(__file__).resolve().parents[1] / "configs" / "safety"
LABELS = [{"name": "minor_paraphrase", "threshold": 0.5, "signals": ["minor"]},
          {"name": "harm_paraphrase", "threshold": 0.5, "action": "block"}]


def _rules_with_classifier(tmp_path: Path, labels=LABELS, model: str = "tiny.onnx") -> Path:
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules)
    build(rules / "tiny.onnx", {"cherubic": 0, "glimmerwrong": 1}, labels=2)
    doc = yaml.safe_load((rules / "prompt_audit.yaml").read_text(encoding="utf-8"))
    doc["text_classifier"] = {"path": model, "labels": labels}
    (rules / "prompt_audit.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return rules


def test_hashed_features_are_unit_length_and_follow_the_normalised_words():
    a = hashed_features("Ｃherubic nude", 4096)
    assert a.shape == (1, 4096) and a.dtype == np.float32
    assert np.isclose(np.linalg.norm(a), 1.0)
    assert np.array_equal(a, hashed_features("cherubic NUDE", 4096))
    assert not hashed_features("", 4096).any()


def test_configured_classifier_adds_its_signals_and_actions(tmp_path):
    auditor = PromptAuditor.from_dir(_rules_with_classifier(tmp_path))
    v = auditor.audit("nude, cherubic figure on a bed")
    assert v.action is Action.block and v.minor_signal
    assert {"classifier.minor_paraphrase", "minor_with_mature"} <= set(v.rule_ids)
    assert auditor.audit("a cherubic baby angel in a fresco").action is Action.allow  # minor alone is allowed
    v = auditor.audit("glimmerwrong scene")
    assert v.action is Action.block and v.rule_ids == ["classifier.harm_paraphrase"]
    assert auditor.audit("nude woman, oil painting").action is Action.allow
    without = PromptAuditor.from_dir(RULES_DIR)
    assert without.audit("nude, cherubic figure on a bed").action is Action.allow


def test_a_missing_model_or_a_label_count_mismatch_fails_at_start(tmp_path):
    with pytest.raises(RulesInvalid):
        PromptAuditor.from_dir(_rules_with_classifier(tmp_path / "a", model="missing.onnx"))
    with pytest.raises(RulesInvalid, match="labels"):
        PromptAuditor.from_dir(_rules_with_classifier(tmp_path / "b", labels=LABELS[:1]))


def test_a_failing_classifier_fails_closed(tmp_path, monkeypatch):
    auditor = PromptAuditor.from_dir(_rules_with_classifier(tmp_path))

    def broken(self, prompt):
        raise RuntimeError("session lost")

    monkeypatch.setattr(TextClassifier, "probabilities", broken)
    with pytest.raises(SafetyError):
        auditor.audit("a landscape")


def test_thresholds_outside_0_and_1_are_rejected():
    with pytest.raises(ValueError):
        ClassifierConfig(path="x.onnx", labels=[{"name": "x", "threshold": 1.0}])

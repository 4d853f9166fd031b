"""Input-image safety (img2img, inpaint, face fix of a user's image): the face floor and its config,
the face and suggestive-prompt rules and their carry-over to the output postcheck.

No photograph of a person or nude image can be a fixture here, so where a test needs the scanner to
see a face or exposure it replaces only NudeNet's detector object with one returning the raw
detections the real model would give, saying so; thresholds, scan and policy are the real code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from safety.errors import RulesInvalid
from safety.image_scan import FACE_SCORE_FLOOR, ImageScanConfig, ImageScanner
from safety.input_policy import judge_input
from safety.levels import NsfwLevel

RULES_DIR = Path(__file__).resolve().parents[1] / "configs" / "safety"


class RawDetections:
    """NudeNet's detector replaced by the raw output the model would give for a photograph."""

    def __init__(self, detections: list[dict]):
        self.detections = detections

    def detect(self, bgr):  # noqa: ANN001, ANN201
        return [dict(d) for d in self.detections]


def _config(tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    data = yaml.safe_load((RULES_DIR / "image_scan.yaml").read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "image_scan.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ the face floor


@pytest.mark.parametrize("mutate, words", [
    (lambda d: [d["nudenet"].pop(k) for k in ("FACE_FEMALE", "FACE_MALE")], "face classes"),
    (lambda d: d["nudenet"].pop("FACE_MALE"), "face classes"),
    (lambda d: d["nudenet"].update(FACE_FEMALE=[{"min_score": 0.95, "level": "PG"}]), "FACE_FEMALE"),
    (lambda d: d.update(face_min_score=0.5), "face_min_score"),
])
def test_a_config_that_would_hide_faces_is_refused_at_load(tmp_path, mutate, words):
    with pytest.raises(RulesInvalid, match=words):
        ImageScanConfig.load(_config(tmp_path, mutate))


def test_config_may_only_lower_the_face_floor(tmp_path):
    def lower(d: dict) -> None:
        d["face_min_score"] = 0.2
        d["nudenet"]["FACE_FEMALE"] = d["nudenet"]["FACE_MALE"] = [{"min_score": 0.2, "level": "PG"}]

    scanner = ImageScanner.from_config(_config(tmp_path, lower), detector=RawDetections([]))
    assert scanner.face_min_score == 0.2
    assert ImageScanner.from_config(RULES_DIR, detector=RawDetections([])).face_min_score == FACE_SCORE_FLOOR


def test_a_face_the_face_fix_would_repaint_counts_for_the_nudify_rule():
    from genserve.generation.protocol import FaceFix
    from genserve.generation.worker.wire import FaceFixSpec

    assert FaceFix().confidence == FaceFixSpec().confidence == FACE_SCORE_FLOOR  # one value, both sides
    # the detector reports a face at 0.35: above the face fix's confidence, so it counts here too
    scanner = ImageScanner.from_config(RULES_DIR, detector=RawDetections(
        [{"class": "FACE_FEMALE", "score": 0.35, "box": [10, 10, 30, 30]}]))
    scan = scanner.scan(Image.new("RGB", (64, 64)))
    decision = judge_input(scan, workflow="img2img", prompt_mature=True, allowed=NsfwLevel.X,
                           face_min_score=scanner.face_min_score)
    assert decision.faces and "input.likeness_nudify" in decision.verdict.rule_ids
    # a caller cannot raise the floor past the face fix's either
    assert judge_input(scan, workflow="img2img", prompt_mature=True, allowed=NsfwLevel.X,
                       face_min_score=0.9).faces

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


# ------------------------------------------------------ a small picture on a big canvas (scale)

MARK = (255, 0, 255)  # stands for exposed skin in a photograph: no such photograph can be a fixture


class ScaleAwareDetector:
    """NudeNet's detector replaced by one that behaves as it does with scale: it pads the view to a
    square shrunk to 320 px, as NudeNet does, and "sees" the marked patch (reported as the raw output
    for an exposed breast) only when the patch is at least `min_px` there."""

    size = 320

    def __init__(self, min_px: int = 24):
        self.min_px = min_px
        self.views: list[tuple[int, int]] = []

    def detect(self, bgr):  # noqa: ANN001, ANN201
        import numpy as np

        height, width = bgr.shape[:2]
        self.views.append((width, height))
        ys, xs = np.nonzero(np.all(bgr == MARK[::-1], axis=2))
        if not len(xs):
            return []
        extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        if extent * self.size / max(width, height) < self.min_px:
            return []
        box = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": box}]


def _canvas(side: int, photo: int, mark: int, at: tuple[int, int] = (0, 0)) -> Image.Image:
    """A white canvas with a `photo`-sized picture at `at` holding a `mark`-sized marked patch."""
    from PIL import ImageDraw

    canvas = Image.new("RGB", (side, side), "white")
    x, y = at
    ImageDraw.Draw(canvas).rectangle((x, y, x + photo - 1, y + photo - 1), fill=(200, 160, 140))
    ImageDraw.Draw(canvas).rectangle((x + photo // 3, y + photo // 2, x + photo // 3 + mark - 1,
                                      y + photo // 2 + mark - 1), fill=MARK)
    return canvas


def test_a_small_photo_on_a_big_canvas_is_scanned_at_the_detectors_scale():
    from safety.input_scan import scan_views

    detector = ScaleAwareDetector()
    scanner = ImageScanner.from_config(RULES_DIR, detector=detector)
    canvas = _canvas(4096, 512, 160)
    assert scanner.scan(canvas).level is NsfwLevel.PG  # the whole canvas shrunk to 320 px: 12 px, missed
    scan = scan_views(scanner, canvas)
    assert scan.level is NsfwLevel.R and not scan.failed
    [found] = [d for d in scan.detections if d.label == "FEMALE_BREAST_EXPOSED"]
    assert found.box[:2] == (512 // 3, 256)  # in the canvas's coordinates, not a tile's
    tiles = [v for v in detector.views if max(v) < 4096]
    assert len(tiles) == 12 * 12 and max(max(v) for v in tiles) <= 2 * ScaleAwareDetector.size  # ~2x scale


def test_the_only_masked_region_is_the_engines_and_is_scanned_at_its_own_scale():
    from PIL import ImageDraw

    from genserve.engine import img2img
    from genserve.generation.inputs import DecodedInput
    from genserve.generation.protocol import GenerationRequest
    from genserve.generation.workflows import PlanInputs, work_regions
    from safety.input_scan import scan_views

    canvas = _canvas(1200, 300, 60, at=(900, 900))
    mask = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(mask).rectangle((900, 960, 1199, 1199), fill=255)
    request = GenerationRequest.model_validate({
        "prompt": "a red dress", "checkpoint": "tiny-sd1", "workflow": "inpaint", "init_image": {"data": "AA=="},
        "mask": {"data": "AA=="}, "inpaint_only_masked": True, "inpaint_padding": 40, "mask_blur": 6})
    inputs = PlanInputs(DecodedInput(canvas, b"", ""), DecodedInput(mask, b"", ""))
    [box] = work_regions(request, inputs, (512, 512))
    engine = img2img.prepare(type("Spec", (), {"workflow": "inpaint", "denoise": 0.75, "resize_mode": "just_resize",
                                               "mask_blur": 6, "only_masked": True, "padding": 40})(),
                             canvas, mask, 512, 512)
    assert box == engine.paste_box  # the same function as the engine's, not a copy
    scanner = ImageScanner.from_config(RULES_DIR, detector=ScaleAwareDetector())
    assert scanner.scan(canvas).level is NsfwLevel.PG  # 60 px of 1200 at 320: 16 px, missed whole
    assert scan_views(scanner, canvas, [box], tile=False, rotations=False).level is NsfwLevel.R


def test_the_output_of_an_only_masked_inpaint_is_scanned_in_its_worked_box():
    from types import SimpleNamespace

    from PIL import ImageDraw

    from genserve.generation.worker.core import WorkerCore, output_regions
    from genserve.generation.worker.wire import InitSpec, WorkerRequest

    mask = Image.new("L", (1200, 1200), 0)
    ImageDraw.Draw(mask).rectangle((900, 960, 1199, 1199), fill=255)
    spec = InitSpec(workflow="inpaint", image_key="k/i.png", image_sha256="0" * 64, mask_key="k/m.png",
                    mask_sha256="0" * 64, only_masked=True, padding=40, mask_blur=6)
    request = WorkerRequest(job_id="j", checkpoint_id="c", prompt="p", sampler="Euler a", steps=4, width=512,
                            height=512, seeds=[1], init=spec)
    regions = output_regions(request, (Image.new("RGB", mask.size), mask))
    assert len(regions) == 1
    output = _canvas(1200, 300, 60, at=(900, 900))  # what came back: the repainted box shows exposure
    worker = SimpleNamespace(scanner=ImageScanner.from_config(RULES_DIR, detector=ScaleAwareDetector()),
                             _scanner_error=None)
    assert WorkerCore.scan(worker, output).level == "pg"  # the whole output: missed
    assert WorkerCore.scan(worker, output, regions).level == "r"


# ------------------------------------- faces and minors below R: the edit and the delivered output

FACE = {"class": "FACE_FEMALE", "score": 0.9, "box": [10, 10, 30, 30]}


def _verdict(prompt: str, allowed: NsfwLevel = NsfwLevel.PG13):  # noqa: ANN202
    from safety.policy import SafetyPolicy

    return SafetyPolicy.from_dir(RULES_DIR).precheck(prompt, "", [], [], allowed)


def _judge(detections: list[dict], prompt: str, allowed: NsfwLevel = NsfwLevel.PG13, minor: bool = False):  # noqa: ANN202
    from safety.image_scan import ScanResult

    out = ImageScanner.from_config(RULES_DIR, detector=RawDetections(detections)).scan(Image.new("RGB", (64, 64)))
    verdict = _verdict(prompt, allowed)
    decision = judge_input(ScanResult(out.level, out.detections, minor), workflow="inpaint",
                           prompt_mature=verdict.mature, allowed=allowed, request_minor=verdict.minor_signal,
                           prompt_suggestive="suggestive" in verdict.tags)
    return verdict, decision


def test_a_face_edited_with_a_suggestive_prompt_is_refused_at_pg13():
    # the detector reports a face in the input (a photograph of a person cannot be a fixture)
    _, decision = _judge([FACE], "a woman in a see-through wet shirt")
    assert decision.verdict.blocked and "input.likeness_nudify" in decision.verdict.rule_ids
    _, decision = _judge([], "a woman in a see-through wet shirt", minor=True)  # the age slot reports a minor
    assert decision.verdict.blocked and "input.minor_mature" in decision.verdict.rule_ids
    _, decision = _judge([FACE], "make it an oil painting")  # benign edit of a portrait at PG13: allowed
    assert not decision.verdict.blocked


def test_an_allowed_inputs_face_and_minor_findings_reach_the_output_postcheck():
    from safety.image_scan import ScanResult
    from safety.input_policy import TAG_INPUT_FACE, TAG_INPUT_MINOR, carry_findings
    from safety.policy import SafetyPolicy

    policy = SafetyPolicy.from_dir(RULES_DIR)
    verdict, decision = _judge([FACE], "make it an oil painting", minor=True)
    assert not decision.verdict.blocked  # nothing suggestive asked at PG13
    carried = carry_findings(verdict, decision)
    assert {TAG_INPUT_FACE, TAG_INPUT_MINOR} <= carried.tags
    for allowed in (NsfwLevel.PG13, NsfwLevel.X):  # withheld for review, whatever the allowed level
        out = policy.postcheck(ScanResult(NsfwLevel.R), carried, allowed)
        assert not out.deliver and out.action.value == "review"
        assert out.rule_ids[0] in ("exposure_with_minor_signal", "mature_image_with_minor_signal")
    face_only = carry_findings(*_judge([FACE], "make it an oil painting"))
    out = policy.postcheck(ScanResult(NsfwLevel.R), face_only, NsfwLevel.X)
    assert not out.deliver and out.rule_ids == ["edited_face_with_exposure"] and out.action.value == "review"
    assert policy.postcheck(ScanResult(NsfwLevel.PG13), face_only, NsfwLevel.PG13).deliver
    minor_only = carry_findings(*_judge([], "make it an oil painting", minor=True))
    out = policy.postcheck(ScanResult(NsfwLevel.PG13), minor_only, NsfwLevel.PG13)
    assert not out.deliver and out.reasons[0].matched == "input"


# ------------------------------------------------------------------------- the mask is a shape

def test_a_picture_sent_as_a_mask_comes_back_as_a_shape_only():
    import io

    import numpy as np

    from genserve.core.config.generation import InputImageLimits
    from genserve.engine import img2img
    from genserve.generation.inputs import decode_image

    # any greyscale picture: a gradient with a darker square, as a user could send in place of a mask
    picture = np.add.outer(np.arange(128), np.arange(128)).astype(np.uint8)
    picture[32:96, 32:96] //= 3
    data = io.BytesIO()
    Image.fromarray(picture).save(data, format="PNG")
    mask = decode_image(data.getvalue(), InputImageLimits(), field="mask", mask=True).image
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert np.array_equal(np.asarray(mask) == 255, picture > 128)  # A1111's threshold
    # black input, every repainted pixel white: what comes back is the shape, not the picture
    spec = type("Spec", (), {"workflow": "inpaint", "denoise": 1.0, "resize_mode": "just_resize", "mask_blur": 0,
                             "only_masked": False, "padding": 0})()
    prepared = img2img.prepare(spec, Image.new("RGB", mask.size), mask, 128, 128)
    out = np.asarray(prepared.finish(Image.new("RGB", (128, 128), "white")).convert("L"))
    assert len(np.unique(out)) <= 2 and not np.array_equal(out, picture)
    # a drawn mask with transparency is read from its alpha, as A1111 reads it
    drawn = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    drawn.paste((0, 0, 0, 255), (4, 4, 12, 12))
    data = io.BytesIO()
    drawn.save(data, format="PNG")
    shape = decode_image(data.getvalue(), InputImageLimits(), field="mask", mask=True).image
    assert shape.getbbox() == (4, 4, 12, 12) and shape.getpixel((5, 5)) == 255


# --------------------------------------------------------------------------- faces on their side

TOP, BOTTOM = (0, 255, 0), (0, 0, 255)  # a "face" the stand-in detector knows: this colour above that one


class UprightFaceDetector:
    """NudeNet's detector replaced by one that, like the real model, finds a face only upright: it
    reports the raw output for a face (no photograph of a person can be a fixture) where a TOP-coloured
    patch sits right above a BOTTOM-coloured one, and nothing for the same patch turned."""

    size = 320

    def __init__(self):
        self.views = 0

    def detect(self, bgr):  # noqa: ANN001, ANN201
        import numpy as np

        self.views += 1
        top = np.argwhere(np.all(bgr == TOP[::-1], axis=2))
        bottom = np.argwhere(np.all(bgr == BOTTOM[::-1], axis=2))
        if not len(top) or not len(bottom):
            return []
        (ty, tx), (by, bx) = top.mean(axis=0), bottom.mean(axis=0)
        if not (ty < by and abs(tx - bx) < 2):
            return []
        both = np.vstack([top, bottom])
        (y1, x1), (y2, x2) = both.min(axis=0), both.max(axis=0)
        return [{"class": "FACE_FEMALE", "score": 0.8, "box": [int(x1), int(y1), int(x2 - x1 + 1), int(y2 - y1 + 1)]}]


def _portrait() -> Image.Image:
    """A 200 x 120 picture with an upright "face" at (30, 20)-(69, 59)."""
    image = Image.new("RGB", (200, 120), (120, 120, 120))
    image.paste(TOP, (30, 20, 70, 40))
    image.paste(BOTTOM, (30, 40, 70, 60))
    return image


@pytest.mark.parametrize("turn", [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                  Image.Transpose.ROTATE_270])
def test_a_face_on_its_side_or_upside_down_is_found_where_it_is(turn):
    import numpy as np

    from safety.input_scan import scan_views

    image = _portrait().transpose(turn)
    detector = UprightFaceDetector()
    scanner = ImageScanner.from_config(RULES_DIR, detector=detector)
    assert not scanner.scan(image).detections  # upright only: missed
    [face] = scan_views(scanner, image).detections
    ys, xs = np.nonzero(np.any(np.asarray(image) != 120, axis=2))
    assert face.label == "FACE_FEMALE" and face.box == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)
    decision = judge_input(scan_views(scanner, image), workflow="img2img", prompt_mature=True, allowed=NsfwLevel.X)
    assert "input.likeness_nudify" in decision.verdict.rule_ids


def test_an_upright_face_costs_no_turned_scans():
    from safety.input_scan import scan_views

    detector = UprightFaceDetector()
    scan = scan_views(ImageScanner.from_config(RULES_DIR, detector=detector), _portrait())
    assert [d.box for d in scan.detections] == [(30, 20, 40, 40)] and detector.views == 1
    detector = UprightFaceDetector()
    scan_views(ImageScanner.from_config(RULES_DIR, detector=detector), Image.new("RGB", (64, 64)))
    assert detector.views == 5  # no face: upright, then turned three ways and mirrored

"""Auto-captioning: a tiny WD-style ONNX tagger built offline, proposed captions the user edits before
submitting, auto-captions at intake, and the tagger's rating / age-related tags in the dataset gate."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from tagger_model import build_tagger
from test_training_api import server  # noqa: F401 - fixture
from test_training_service import SMALL, make_service, one_thread  # noqa: F401 - fixtures
from training_support import toy_image

from genserve.core.errors import InvalidRequest, SafetyBlocked
from training.captioning import CaptionerUnavailable, WdTagger, build_captioner, register_vlm_backend
from training.config import CaptioningSettings
from training.run import JobRunner
from training.service import Submission, TrainingService

RED, BLUE, GREEN, YELLOW = 0, 1, 2, 3  # toy_image colours


def colour_zip(path: Path, indices: list[int], captions: dict[int, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for i in indices:
            buf = io.BytesIO()
            toy_image(i).save(buf, format="PNG")
            zf.writestr(f"img{i}.png", buf.getvalue())
            if captions and i in captions:
                zf.writestr(f"img{i}.txt", captions[i])
    return path


@pytest.fixture(scope="module")
def tagger_files(tmp_path_factory) -> tuple[Path, Path]:
    return build_tagger(tmp_path_factory.mktemp("tagger"))


def with_tagger(service: TrainingService, tagger_files) -> TrainingService:  # noqa: ANN001
    model, tags = tagger_files
    service.deps.limits = service.deps.limits.model_copy(update={"captioning": CaptioningSettings(
        kind="wd_tagger", model_path=str(model), tags_csv=str(tags))})
    return service


def test_wd_tagger_captions_with_thresholds_rating_and_minor_tags(tagger_files) -> None:
    model, tags = tagger_files
    tagger = WdTagger(model, tags, minor_tags=["loli"])
    red, blue, green = tagger.caption([toy_image(RED), toy_image(BLUE), toy_image(GREEN)])
    assert red.text == "hatsune miku, red background, 1girl, solo"  # character first, kohya's spacing
    assert (red.rating, red.minor_tags) == ("general", ())
    assert blue.minor_tags == ("loli",) and green.rating == "explicit"
    strict = WdTagger(model, tags, general_threshold=0.9, character_threshold=0.999, exclude_tags=["1girl"])
    assert strict.caption([toy_image(RED)])[0].text == "red background"  # over 0.9, miku under 0.999


def test_vlm_captioner_slot_with_a_registered_backend() -> None:
    class Stub:
        def __init__(self, options):  # noqa: ANN001
            self.options = options

        def describe(self, image, prompt: str) -> str:  # noqa: ANN001
            return f"  a {image.size[0]}px   picture ({self.options['model']}: {prompt})"

    register_vlm_backend("stub-vlm", Stub)
    captioner = build_captioner(CaptioningSettings(kind="vlm", vlm_backend="stub-vlm", vlm_options={"model": "m"},
                                                   vlm_prompt="describe"))
    assert captioner.caption([toy_image(0)])[0].text == "a 64px picture (m: describe)"
    with pytest.raises(CaptionerUnavailable):
        build_captioner(CaptioningSettings(kind="vlm", vlm_backend="not-registered"))
    assert build_captioner(CaptioningSettings()) is None


def test_proposed_captions_are_edited_then_trained_and_auto_captions_fill_the_rest(tmp_path: Path, make_service,  # noqa: F811
                                                                                  tagger_files) -> None:
    service = with_tagger(make_service(), tagger_files)
    data = colour_zip(tmp_path / "d.zip", [RED, YELLOW], captions={YELLOW: "my own caption"})
    proposed = service.propose_captions("alice", data)
    assert proposed["captioner"] == "wd_tagger"
    by_name = {p["name"]: p for p in proposed["images"]}
    assert by_name["img0.png"]["caption"] == "hatsune miku, red background, 1girl, solo"
    assert by_name["img0.png"]["source"] == "wd_tagger" and by_name["img0.png"]["audit"]["action"] == "allow"
    assert (by_name["img3.png"]["caption"], by_name["img3.png"]["source"]) == ("my own caption", "user")
    assert service.list() == []  # nothing stored, nothing held

    edited = service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL,
                                                      captions={"img0.png": "tqz girl,  red background"}))
    captions = {i["name"]: i["caption"] for i in edited.intake_report["images"]}
    assert captions == {"img0.png": "tqz girl, red background", "img3.png": "my own caption"}

    auto = service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL, auto_caption=True))
    captions = {i["name"]: i["caption"] for i in auto.intake_report["images"]}
    assert captions == {"img0.png": "hatsune miku, red background, 1girl, solo", "img3.png": "my own caption"}
    assert auto.intake_report["warnings"]["auto_captioned"] == ["img0.png"] and auto.status == "queued"
    assert JobRunner(service.deps, auto.id, auto.ray_job_id).run() == 0
    assert service.get(auto.id, "alice").status == "succeeded"

    with pytest.raises(InvalidRequest) as err:
        service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL, captions={"nope.png": "x"}))
    assert err.value.code == "unknown_caption_file"


def test_a_tagger_minor_tag_sends_the_dataset_to_review_and_with_explicit_blocks_it(tmp_path: Path, make_service,  # noqa: F811
                                                                                   tagger_files) -> None:
    service = with_tagger(make_service(), tagger_files)
    row = service.submit("alice", colour_zip(tmp_path / "b.zip", [BLUE, YELLOW]),
                         Submission("sd1", real_person=False, params=SMALL, auto_caption=True))
    verdict = row.safety["verdict"]
    assert row.status == "review" and "dataset.minor_signal" in verdict["rules"]
    assert {"name": "img1.png", "rules": ["tagger.minor_tag"]} in verdict["findings"]
    with pytest.raises(SafetyBlocked) as err:
        service.submit("alice", colour_zip(tmp_path / "bg.zip", [BLUE, GREEN]),
                       Submission("sd1", real_person=False, params=SMALL, auto_caption=True))
    assert err.value.code == "dataset_blocked" and "dataset.minor_in_mature" in err.value.details["rules"]
    assert {"name": "img2.png", "rules": ["tagger.rating.explicit"]} in err.value.details["findings"]


def test_auto_captioning_is_priced_per_image_in_proposals_and_at_intake(tmp_path: Path, make_service,  # noqa: F811
                                                                        tagger_files) -> None:
    """configs/pricing.yaml prices captioning per captioned image: a proposal is charged for the images
    the captioner ran on (held first, captured after), an auto-captioned submit carries a `captioning`
    line in its quote that is captured with the run, and captions the user supplies cost nothing."""
    service = with_tagger(make_service(), tagger_files)
    ledger, pricing = service.deps.ledger, service.deps.pricing
    per_image = pricing.prices.training.captioning_millibuzz_per_image
    assert per_image > 0
    data = colour_zip(tmp_path / "p.zip", [RED, YELLOW, GREEN], captions={YELLOW: "mine"})
    before = ledger.balance("user:alice").posted
    proposed = service.propose_captions("alice", data)
    assert proposed["charged"] == pricing.captioning_cost(2) == -(-2 * per_image // 1000)
    assert ledger.balance("user:alice").posted == before - proposed["charged"]
    assert ledger.balance("user:alice").held == 0
    everything = service.propose_captions("alice", data, overwrite=True)
    assert everything["charged"] == pricing.captioning_cost(3)

    mine = service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL,
                                                    captions={"img0.png": "a", "img2.png": "b"}, auto_caption=True))
    assert "captioning" not in {item["name"] for item in mine.quote["items"]}
    data = colour_zip(tmp_path / "a.zip", [RED, YELLOW], captions={YELLOW: "mine"})
    auto = service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL, auto_caption=True))
    items = {item["name"]: item for item in auto.quote["items"]}
    assert items["captioning"]["amount"] == pricing.captioning_cost(1)
    assert auto.quote_total == sum(item["amount"] for item in auto.quote["items"])
    posted = ledger.balance("user:alice").posted
    assert JobRunner(service.deps, auto.id, auto.ray_job_id).run() == 0
    assert ledger.balance("user:alice").posted == posted - auto.quote_total


def test_a_captioning_proposal_the_user_cannot_pay_for_is_refused_before_the_captioner_runs(
        tmp_path: Path, make_service, tagger_files) -> None:  # noqa: F811
    from genserve.billing.errors import InsufficientBuzz

    service = with_tagger(make_service(), tagger_files)
    data = colour_zip(tmp_path / "p.zip", [RED])
    with pytest.raises(InsufficientBuzz):
        service.propose_captions("bob", data)  # bob has no buzz
    assert service.deps.ledger.balance("user:bob").held == 0


def test_without_a_captioner_auto_captioning_is_refused(tmp_path: Path, make_service) -> None:  # noqa: F811 - the imported fixture
    service = make_service()
    data = colour_zip(tmp_path / "d.zip", [RED])
    with pytest.raises(CaptionerUnavailable):
        service.submit("alice", data, Submission("sd1", real_person=False, params=SMALL, auto_caption=True))
    with pytest.raises(CaptionerUnavailable):
        service.propose_captions("alice", data)
    assert service.list() == []


def test_captions_over_http(server, tmp_path: Path, tagger_files) -> None:  # noqa: F811
    url, service = server
    with_tagger(service, tagger_files)
    token = service.deps.settings.auth.service_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}", "X-User-Id": "alice"}
    data = colour_zip(tmp_path / "h.zip", [RED, YELLOW], captions={YELLOW: "mine"})
    with data.open("rb") as f:
        resp = httpx.post(f"{url}/v1/trainings/captions", headers=headers, files={"dataset": ("h.zip", f)},
                          data={"overwrite": "true"}, timeout=60)
    assert resp.status_code == 200, resp.text
    images = {i["name"]: i for i in resp.json()["images"]}
    assert images["img3.png"]["source"] == "wd_tagger" and images["img3.png"]["caption"] == "1girl, solo"
    edits = {name: i["caption"] + ", edited" for name, i in images.items()}
    with data.open("rb") as f:
        resp = httpx.post(f"{url}/v1/trainings", headers=headers, files={"dataset": ("h.zip", f)}, timeout=60,
                          data={"family": "sd1", "real_person": "false", "params": json.dumps(SMALL),
                                "captions": json.dumps(edits)})
    assert resp.status_code == 202, resp.text
    row = service.records.get(resp.json()["id"])
    assert {i["name"]: i["caption"] for i in row.intake_report["images"]} == edits

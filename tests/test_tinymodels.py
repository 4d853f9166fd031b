"""Tiny offline models: real CLIP tokenizer, deterministic builds, on-disk layout, safety embeddings, CLI."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from genserve.tinymodels import (
    CLIP_VOCAB_SIZE,
    build_safety_embeddings,
    build_tiny_models,
    build_tiny_pipeline,
    clip_tokenizer,
)


def test_clip_tokenizer_matches_real_clip_ids():
    tok = clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_sdxl_tokenizers_pad_like_sdxl():
    pipe = build_tiny_pipeline("sdxl")
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2("a cat", padding="max_length", max_length=77).input_ids[-1] == 0


def test_build_tiny_pipeline_is_seeded_and_leaves_global_rng_alone():
    import torch

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_pipeline("sd1", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_tiny_pipeline("sd1", seed=7)
    c = build_tiny_pipeline("sd1", seed=8)
    w = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[w], b.unet.state_dict()[w])
    assert not torch.equal(a.unet.state_dict()[w], c.unet.state_dict()[w])


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown model family"):
        build_tiny_pipeline("sd3")


def test_layout_matches_models_yaml(tiny_models):
    import yaml

    from genserve.core.config import load_settings

    models_yaml = yaml.safe_load(load_settings().config_path("models.yaml").read_text())
    models_dir = tiny_models["sd1"].root.parent
    for ckpt in models_yaml["checkpoints"]:
        assert (models_dir / ckpt["path"]).exists(), ckpt
        if "config" in ckpt:
            config = models_dir / ckpt["config"]
            assert (config / "model_index.json").is_file()
            assert not list(config.rglob("*.safetensors")), "the config folder holds no weights"
    for family, spec in models_yaml["families"].items():
        for kind, emb in spec["safety_embeddings"].items():
            assert tiny_models[family].embeddings[kind] == models_dir / emb["file"]


@pytest.mark.parametrize(
    ("family", "shapes"),
    [
        ("sd1", {"emb_params": 32}),
        ("sdxl", {"clip_l": 32, "clip_g": 48}),
    ],
)
def test_safety_embedding_files(tiny_models, family, shapes):
    vectors = {"general": 2, "minor": 1}
    files = tiny_models[family].embeddings
    assert set(files) == {"general", "minor"}
    for kind, path in files.items():
        tensors = load_file(path)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {
            k: (vectors[kind], w) for k, w in shapes.items()
        }
    general, minor = load_file(files["general"]), load_file(files["minor"])
    key = next(iter(shapes))
    assert not general[key][:1].equal(minor[key])


def test_safety_embeddings_depend_on_seed():
    a, b, c = (build_safety_embeddings("sdxl", seed=s) for s in (0, 0, 1))
    assert a["general"]["clip_g"].equal(b["general"]["clip_g"])
    assert not a["general"]["clip_g"].equal(c["general"]["clip_g"])


def _manifest(model) -> dict:
    return json.loads((model.root / "manifest.json").read_text())


def test_same_seed_gives_bit_identical_files(tiny_models, tmp_path):
    again = build_tiny_models(tmp_path / "models", seed=0)
    for family in ("sd1", "sdxl"):
        first, second = _manifest(tiny_models[family]), _manifest(again[family])
        assert first["files"] == second["files"]
        assert any(name.endswith(f"tiny-{family}.safetensors") for name in first["files"])
        assert len(first["files"]) >= 10


def test_rebuild_only_when_needed(tmp_path):
    models_dir = tmp_path / "models"
    model = build_tiny_models(models_dir, seed=3, families=["sd1"])["sd1"]
    hashes = _manifest(model)["files"]
    stamp = model.single_file.stat().st_mtime_ns

    build_tiny_models(models_dir, seed=3, families=["sd1"])
    assert model.single_file.stat().st_mtime_ns == stamp, "an identical build is reused"

    model.embeddings["general"].write_bytes(b"corrupt")
    build_tiny_models(models_dir, seed=3, families=["sd1"])
    assert _manifest(model)["files"] == hashes, "a damaged build is rebuilt to the same bytes"

    build_tiny_models(models_dir, seed=4, families=["sd1"])
    assert _manifest(model)["seed"] == 4 and _manifest(model)["files"] != hashes

    build_tiny_models(models_dir, seed=3, families=["sd1"], force=True)
    assert _manifest(model)["files"] == hashes
    leftovers = [p for p in models_dir.rglob("*") if "staging" in p.name or p.suffix == ".tmp"]
    assert not leftovers


def test_cli_tiny_models_json(tiny_models):
    from genserve.cli import app

    models_dir = tiny_models["sd1"].root.parent
    stamp = tiny_models["sdxl"].single_file.stat().st_mtime_ns
    result = CliRunner().invoke(app, ["tiny-models", "--out", str(models_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seed"] == 0
    assert set(data["models"]) == {"sd1", "sdxl"}
    for family, model in tiny_models.items():
        entry = data["models"][family]
        assert entry["single_file"] == str(model.single_file)
        assert entry["config_dir"] == str(model.config_dir)
        assert entry["embeddings"] == {k: str(v) for k, v in model.embeddings.items()}
    assert tiny_models["sdxl"].single_file.stat().st_mtime_ns == stamp


def test_cli_tiny_models_defaults_to_settings_models_dir(tmp_path, monkeypatch):
    from genserve.cli import app

    monkeypatch.delenv("GENSERVE_SETTINGS_JSON", raising=False)
    monkeypatch.delenv("GENSERVE_CONFIG_DIR", raising=False)
    monkeypatch.setenv("GENSERVE_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["tiny-models", "--seed", "1"])
    assert result.exit_code == 0, result.output
    models_dir = (tmp_path / "data" / "models").resolve()
    assert str(models_dir) in result.stdout
    assert (models_dir / "tiny-sd1" / "tiny-sd1.safetensors").is_file()
    assert (models_dir / "embeddings" / "sdxl-safe-minor.safetensors").is_file()

"""Loading tiny checkpoints from diffusers folders and single files; the LDM export they rely on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from genserve.core.errors import ConfigError, GenserveError, InvalidRequest, NotFound
from genserve.engine.loading import (
    CheckpointLoadError,
    default_dtype,
    load_pipeline,
    pipeline_class,
)
from genserve.engine.single_file import pipeline_to_ldm


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """Both formats of both families, loaded once for the module."""
    pipes = {}
    for family, model in tiny_models.items():
        pipes[family, "diffusers"] = load_pipeline(family, model.diffusers_dir, "diffusers", device="cpu")
        pipes[family, "safetensors"] = load_pipeline(
            family, model.single_file, "safetensors", config_dir=model.config_dir, device="cpu"
        )
    return pipes


def _generate(pipe, width: int, height: int):
    return pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=2,
        width=width,
        height=height,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(("width", "height"), [(64, 64), (64, 96)])
def test_single_file_and_diffusers_folder_give_the_same_image(loaded, family, width, height):
    from_folder = _generate(loaded[family, "diffusers"], width, height)
    from_file = _generate(loaded[family, "safetensors"], width, height)
    assert from_folder.shape == (1, height, width, 3)
    assert from_folder.std() > 0.01, "a real image, not a constant"
    assert abs(from_folder - from_file).max() < 1e-4


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_loaded_pipelines_are_the_requested_class_and_dtype(loaded, family):
    for fmt in ("diffusers", "safetensors"):
        pipe = loaded[family, fmt]
        assert type(pipe) is pipeline_class(family)
        assert pipe.unet.dtype == torch.float32
        assert pipe.unet.device.type == "cpu"
        assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        if family == "sdxl":
            assert pipe.tokenizer_2.pad_token == "!"


def test_sdxl_text_encoder_2_loads_its_own_weights_from_single_file(loaded):
    folder, single = loaded["sdxl", "diffusers"], loaded["sdxl", "safetensors"]
    sd_folder, sd_single = folder.text_encoder_2.state_dict(), single.text_encoder_2.state_dict()
    assert single.text_encoder_2.config.hidden_size == 48
    for key in ("text_projection.weight", "text_model.encoder.layers.0.self_attn.k_proj.weight"):
        assert torch.equal(sd_folder[key], sd_single[key]), key
    assert torch.equal(
        folder.text_encoder.state_dict()["embeddings.token_embedding.weight"],
        single.text_encoder.state_dict()["embeddings.token_embedding.weight"],
    )


def test_ldm_export_layout(tiny_models, loaded):
    sd1 = load_file(tiny_models["sd1"].single_file)
    assert sd1["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4, "LDM VAE attention is a 1x1 conv"
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd1
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sd1, (
        "upsampler after a cross-attention block"
    )

    xl = pipeline_to_ldm(loaded["sdxl", "diffusers"])
    openclip = "conditioner.embedders.1.model."
    assert xl[openclip + "text_projection"].shape == (48, 32), "OpenCLIP stores [hidden, proj]"
    assert xl[openclip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    assert "model.diffusion_model.label_emb.0.0.weight" in xl
    assert set(xl) == set(load_file(tiny_models["sdxl"].single_file))


def test_unet_export_inverts_diffusers_converter_for_sd15_block_order():
    """Real SD1.5 starts the decoder with a plain up block (upsampler at `.1.conv`); the tiny models don't."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from genserve.engine.single_file import unet_to_ldm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=16,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    ldm = unet_to_ldm(unet)
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in ldm
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    original = unet.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_default_dtype():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.float16
    assert default_dtype("cuda:1") == torch.float16


def test_single_file_without_config_is_refused(tiny_models, tmp_path):
    model = tiny_models["sd1"]
    with pytest.raises(ConfigError) as err:
        load_pipeline("sd1", model.single_file, "safetensors", device="cpu")
    assert err.value.code == "single_file_config_missing"
    with pytest.raises(ConfigError):
        load_pipeline("sd1", model.single_file, "safetensors", config_dir=tmp_path, device="cpu")


def test_non_safetensors_single_file_is_refused_before_reading(tiny_models, tmp_path):
    pickle_like = tmp_path / "model.ckpt"
    pickle_like.write_bytes(b"not read")
    with pytest.raises(InvalidRequest) as err:
        load_pipeline(
            "sd1", pickle_like, "safetensors", config_dir=tiny_models["sd1"].config_dir, device="cpu"
        )
    assert err.value.code == "not_safetensors"


@pytest.mark.parametrize(
    ("family", "fmt", "code"),
    [("sd3", "diffusers", "unknown_family"), ("sd1", "ckpt", "unknown_format")],
)
def test_unknown_family_or_format(tiny_models, family, fmt, code):
    with pytest.raises(InvalidRequest) as err:
        load_pipeline(family, tiny_models["sd1"].diffusers_dir, fmt, device="cpu")
    assert err.value.code == code


def test_missing_checkpoint(tmp_path):
    with pytest.raises(NotFound):
        load_pipeline("sd1", tmp_path / "absent", "diffusers", device="cpu")


def test_checkpoint_of_the_wrong_family_is_a_typed_error(tiny_models, tmp_path):
    # an SD1 single file read with the SDXL architecture: keys and shapes do not fit
    with pytest.raises(GenserveError) as err:
        load_pipeline(
            "sdxl",
            tiny_models["sd1"].single_file,
            "safetensors",
            config_dir=tiny_models["sdxl"].config_dir,
            device="cpu",
        )
    assert isinstance(err.value, CheckpointLoadError)


def test_truncated_single_file_is_a_typed_error(tiny_models, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_models["sd1"].single_file.read_bytes()[:1000])
    with pytest.raises(CheckpointLoadError):
        load_pipeline("sd1", broken, "safetensors", config_dir=tiny_models["sd1"].config_dir, device="cpu")


def test_diffusers_folder_without_safetensors_is_refused(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["sd1"].diffusers_dir, folder)
    unet_weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle bytes that must never be read")
    with pytest.raises(CheckpointLoadError, match="diffusion_pytorch_model.safetensors"):
        load_pipeline("sd1", folder, "diffusers", device="cpu")

"""A request's VAE on the engine: loading A1111 (LDM) and diffusers VAE files, swapping one in for a job."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from engine_support import one_torch_thread
from safetensors.torch import save_file

from genserve.engine.generate import ModelInfo, generate
from genserve.engine.vae import VaeCache, VaeInvalid, load_vae, vae_swapped
from genserve.generation.worker.wire import HiresSpec, WorkerRequest
from genserve.tinymodels import write_tiny_vae

MODEL = ModelInfo(name="tiny-sd1", model_hash="0123456789")


def _request(**kw) -> WorkerRequest:
    base = dict(job_id="job-1", checkpoint_id="tiny", prompt="a photo of a cat", sampler="Euler a", steps=2,
                width=64, height=64, seeds=[7])
    return WorkerRequest(**{**base, **kw})


def _pixels(pipe, safety, request, **kw) -> bytes:
    with one_torch_thread():
        return generate(pipe, request, safety=safety, model=MODEL, **kw).images[0].image.tobytes()


def test_ldm_and_diffusers_vae_files_load_the_same_weights(pipes, tmp_path):
    pipe, _ = pipes("sd1")
    ldm = load_vae(write_tiny_vae(tmp_path / "ldm.safetensors", seed=3), pipe.vae)
    diffusers = load_vae(write_tiny_vae(tmp_path / "diffusers.safetensors", seed=3, layout="diffusers"), pipe.vae)
    a, b = ldm.state_dict(), diffusers.state_dict()
    assert a.keys() == b.keys() == pipe.vae.state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the weights are the file's, the configuration the checkpoint's (its latent scaling factor)
    assert not torch.equal(a["decoder.conv_out.weight"], pipe.vae.state_dict()["decoder.conv_out.weight"])
    assert ldm.config.scaling_factor == pipe.vae.config.scaling_factor


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_swapped_vae_decodes_the_job_and_the_checkpoints_own_comes_back(pipes, tmp_path, family):
    pipe, safety = pipes(family)
    cache = VaeCache(pipe.vae)
    own = pipe.vae
    # latent hires: the img2img view is made inside the swap the first time, and must not keep the VAE
    request = _request(hires=HiresSpec(scale=1.5, denoise=0.5, steps=1))
    vae = cache.get("sha-a", write_tiny_vae(tmp_path / "a.safetensors", seed=5))
    with vae_swapped(pipe, vae, own):
        swapped = _pixels(pipe, safety, request)
    assert pipe.vae is own
    before_views = _pixels(pipe, safety, request)
    with vae_swapped(pipe, vae, own):
        assert _pixels(pipe, safety, request) == swapped
    assert _pixels(pipe, safety, request) == before_views != swapped
    assert cache.get("sha-a", tmp_path / "gone.safetensors") is vae  # cached: the file is not read again


def test_a_vae_of_another_architecture_is_refused(pipes, tmp_path):
    pipe, _ = pipes("sd1")
    other = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, latent_channels=4)
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(VaeInvalid) as err:
        load_vae(tmp_path / "other.safetensors", pipe.vae)
    assert err.value.code == "vae_invalid"
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04")
    with pytest.raises(VaeInvalid):
        load_vae(tmp_path / "pickle.pt", pipe.vae)

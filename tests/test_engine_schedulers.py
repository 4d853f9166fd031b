"""Sampler names: each builds a fresh scheduler of the right kind from the checkpoint's config and generates."""

from __future__ import annotations

import pytest
from engine_support import load_tiny, one_torch_thread

from genserve.engine.generate import ModelInfo, generate
from genserve.engine.schedulers import SAMPLERS, UnknownSampler, make_scheduler, sampler_names
from genserve.generation.worker.wire import WorkerRequest

REQUIRED = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "LCM", "Heun", "DPM++ SDE Karras"]


@pytest.fixture(scope="module")
def sd1(tiny_models):
    with one_torch_thread():
        yield load_tiny(tiny_models["sd1"])


def test_required_names_and_the_service_samplers_are_known():
    from genserve.generation.protocol import Sampler

    assert set(REQUIRED) <= set(sampler_names())
    assert {s.value for s in Sampler} <= set(sampler_names())


def test_unknown_sampler_is_a_typed_error(sd1):
    pipe, _ = sd1
    with pytest.raises(UnknownSampler) as err:
        make_scheduler("Euler b", pipe.scheduler.config)
    assert err.value.code == "unknown_sampler" and err.value.http_status == 422


def test_each_call_builds_a_new_instance_from_the_checkpoint_config(sd1):
    pipe, _ = sd1
    for name, spec in SAMPLERS.items():
        a, b = make_scheduler(name, pipe.scheduler.config, seed=1), make_scheduler(name, pipe.scheduler.config, seed=1)
        assert a is not b and a is not pipe.scheduler and isinstance(a, spec.scheduler_cls)
        assert a.config.beta_schedule == "scaled_linear" and a.config.num_train_timesteps == 1000
    assert make_scheduler("DPM++ 2M Karras", pipe.scheduler.config).config.use_karras_sigmas is True
    assert make_scheduler("DPM++ 2M", pipe.scheduler.config).config.use_karras_sigmas is False
    assert make_scheduler("DPM++ SDE", pipe.scheduler.config, seed=42).config.noise_sampler_seed == 42


# samplers that draw fresh noise every step: the seed must still pin the image
STOCHASTIC = {n for n in sampler_names() if " a" in n or "SDE" in n} | {"LCM"}


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_generates(sd1, sampler):
    pipe, safety = sd1
    shared = pipe.scheduler
    request = WorkerRequest(job_id="j", checkpoint_id="c", prompt="a red cat", sampler=sampler, steps=2,
                            width=64, height=64, seeds=[3])
    with one_torch_thread():
        first = generate(pipe, request, safety=safety, model=ModelInfo("tiny", "0123456789"))
        assert first.images[0].image.size == (64, 64)
        if sampler in STOCHASTIC:
            again = generate(pipe, request, safety=safety, model=ModelInfo("tiny", "0123456789"))
            assert first.images[0].image.tobytes() == again.images[0].image.tobytes()
    assert pipe.scheduler is shared  # the shared pipeline's scheduler is never replaced

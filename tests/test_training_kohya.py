"""kohya configuration files and option names: mapped onto the parameters, unsupported options refused
by name; a submitted config reaches the trainer; user sample prompts; every epoch's LoRA downloadable."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load
from test_training_service import SMALL, make_service, one_thread  # noqa: F401 - fixtures
from training_support import toy_zip

from genserve.core.errors import InvalidRequest, NotFound, SafetyBlocked
from training.kohya_config import map_options, parse_ai_toolkit, parse_config, parse_kohya
from training.run import JobRunner
from training.service import Submission

# kohya's docs/train_network.md / config_README-en.md examples, adapted to the tiny model (64 px)
KOHYA_CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
network_args = ["conv_dim=2", "conv_alpha=1"]
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "AdamW"
learning_rate = 1e-4
unet_lr = 1e-2
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1

[training_arguments]
output_dir = "./output"
output_name = "my_lora"
save_model_as = "safetensors"
max_train_epochs = 2
save_every_n_epochs = 1
mixed_precision = "fp16"
gradient_checkpointing = false
sdpa = true
seed = 42
min_snr_gamma = 5.0
noise_offset = 0.05
cache_latents = true
caption_extension = ".txt"

[sample_prompt_arguments]
sample_every_n_epochs = 1
sample_sampler = "euler_a"
"""

DATASET_CONFIG = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "/data/train/images"
  num_repeats = 1
  class_tokens = "sks girl"
"""


def test_kohya_files_map_onto_the_parameters() -> None:
    mapped = parse_kohya(KOHYA_CONFIG, DATASET_CONFIG)
    assert mapped.params == {
        "network_dim": 4, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1.0, "text_encoder_lr": 0.0,
        "optimizer": "adamw", "unet_lr": 1e-2, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 1,
        "epochs": 2, "save_every_n_epochs": 1, "mixed_precision": "fp16", "gradient_checkpointing": False,
        "seed": 42, "min_snr_gamma": 5.0, "noise_offset": 0.05, "cache_latents": True, "sample_every_n_epochs": 1,
        "shuffle_caption": True, "keep_tokens": 1, "resolution": 64, "batch_size": 2, "enable_bucket": True,
        "repeats": 1,
    }
    assert mapped.trigger_words == ["sks girl"]
    assert {"pretrained_model_name_or_path", "output_dir", "output_name", "sdpa", "sample_sampler",
            "image_dir", "save_model_as", "caption_extension"} <= set(mapped.ignored)


def test_kohya_names_and_values() -> None:
    assert map_options({"optimizer_type": "AdamW8bit"}).params == {"optimizer": "adamw8bit"}
    assert map_options({"optimizer_type": "Prodigy", "learning_rate": 1.0}).params == {"optimizer": "prodigy",
                                                                                        "unet_lr": 1.0}
    assert map_options({"optimizer_type": "AdaFactor"}).params == {"optimizer": "adafactor"}
    assert map_options({"learning_rate": 1e-4, "unet_lr": 5e-4}).params == {"unet_lr": 5e-4}  # unet_lr wins
    assert map_options({"resolution": "512,512"}).params == {"resolution": 512}
    assert map_options({"epochs": 3, "max_train_epochs": 3}).params == {"epochs": 3}  # ours and kohya's
    assert map_options({"network_args": ["dora_wd=True"]}).params == {"network_type": "dora"}
    assert map_options({"max_train_steps": 100}).params == {"max_train_steps": 100}
    assert map_options({"sample_prompts": "a cat --s 4\na dog"}).params == {"sample_prompts": ["a cat --s 4", "a dog"]}


def test_unsupported_and_unsafe_options_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequest) as err:
        map_options({"network_weights": "old.safetensors", "save_model_as": "ckpt", "resolution": "512,768", "v2": True,
                     "optimizer_type": "DAdaptation", "network_args": ["algo=lokr"], "network_dim": 8,
                     "sample_prompts": "prompts.txt", "gradient_accumulation_steps": 4, "bogus": 1})
    assert err.value.code == "unsupported_training_options"
    assert err.value.details["options"] == sorted([
        "network_weights", "save_model_as", "resolution", "v2", "optimizer_type", "network_args:algo",
        "sample_prompts", "gradient_accumulation_steps", "bogus"])
    assert err.value.details["reasons"]["save_model_as"] == "only ['safetensors'] is supported"
    with pytest.raises(InvalidRequest) as err:
        parse_kohya(dataset_toml=DATASET_CONFIG.replace("num_repeats = 1", "num_repeats = 1\n  [[datasets.subsets]]\n  "
                                           "image_dir = 'b'"))
    assert err.value.details["options"] == ["datasets.subsets"]
    with pytest.raises(InvalidRequest) as err:
        parse_kohya("this is = = not toml")
    assert err.value.code == "invalid_training_config"


def test_a_kohya_config_reaches_the_trainer_with_sample_prompts_and_epoch_downloads(tmp_path: Path,
                                                                                   make_service) -> None:  # noqa: F811 - the imported fixture
    service = make_service()
    deps = service.deps
    config = KOHYA_CONFIG.replace("network_args = [\"conv_dim=2\", \"conv_alpha=1\"]\n", "")
    row = service.submit("alice", toy_zip(tmp_path / "k.zip"), Submission(
        "sd1", real_person=False, trigger_words=("tqz",), config=config, dataset_config=DATASET_CONFIG,
        params={"sample_prompts": ["tqz on a beach --n blurry --w 64 --h 128 --d 7 --l 4 --s 3"]}))
    p = row.params
    assert (p["epochs"], p["network_dim"], p["network_alpha"], p["unet_lr"], p["lr_scheduler"], p["seed"]) == \
        (2, 4, 2.0, 1e-2, "constant_with_warmup", 42)
    assert (p["text_encoder_lr"], p["shuffle_caption"], p["keep_tokens"], p["noise_offset"]) == (0.0, True, 1, 0.05)
    assert row.trigger_words == ["tqz", "sks girl"]
    assert "output_dir" in row.intake_report["config"]["ignored"]
    assert JobRunner(deps, row.id, row.ray_job_id).run() == 0
    done = service.get(row.id, "alice")
    assert done.status == "succeeded"
    assert [(s["epoch"], s["index"]) for s in done.samples] == [(1, 0), (2, 0)]
    from PIL import Image

    assert Image.open(service.sample(row.id, "alice", 2, 0)).size == (64, 128)  # the prompt's --w/--h

    epochs = service.epochs(row.id, "alice")
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["bytes"] > 0 and e["sha256"] for e in epochs)
    name, stream = service.download(row.id, "alice", epoch=1)
    first = load(stream.read())
    assert name.endswith("-000001.safetensors") and any(k.endswith(".alpha") for k in first)
    last = load(service.download(row.id, "alice", epoch=2)[1].read())
    final = load(service.download(row.id, "alice")[1].read())
    assert set(first) == set(last) == set(final)
    assert all((last[k] == final[k]).all() for k in final)  # the last epoch's file is the delivered LoRA
    assert any(not (first[k] == last[k]).all() for k in final)
    with pytest.raises(NotFound) as err:
        service.download(row.id, "alice", epoch=3)
    assert err.value.code == "epoch_not_found"

    resource = service.publish_epoch(row.id, "alice", 1)  # the user's choice of epoch, as a resource
    assert (resource.id, resource.owner_user_id, resource.generation_enabled) == (f"lora-{row.id}-e0001", "alice", True)
    assert resource.sha256 == epochs[0]["sha256"]
    assert service.publish_epoch(row.id, "alice", 1).id == resource.id
    with pytest.raises(NotFound):
        service.publish_epoch(row.id, "mallory", 1)

    import datetime as dt

    finished = service.records.get(row.id).finished_at
    assert service.purge_epoch_loras(finished + dt.timedelta(days=29)) == 0  # kept for 30 days (config)
    assert service.purge_epoch_loras(finished + dt.timedelta(days=31)) == 2
    assert service.epochs(row.id, "alice") == []
    assert service.deps.registry.get(resource.id).generation_enabled  # a published epoch stays


def test_sample_prompts_are_audited_at_submit(tmp_path: Path, make_service) -> None:  # noqa: F811 - the imported fixture
    service = make_service()
    with pytest.raises(SafetyBlocked) as err:
        service.submit("alice", toy_zip(tmp_path / "b.zip"), Submission(
            "sd1", real_person=False, params={**SMALL, "sample_prompts": ["a cat", "nude young girl --s 4"]}))
    assert err.value.code == "sample_prompt_blocked" and err.value.details["rules"]
    with pytest.raises(InvalidRequest) as err:
        service.submit("alice", toy_zip(tmp_path / "c.zip"), Submission(
            "sd1", real_person=False, params={**SMALL, "sample_prompts": ["a cat --ss ddim"]}))
    assert err.value.code == "invalid_sample_prompt"
    assert service.list() == []


# ai-toolkit's config/examples/train_lora_sd15.yaml-style job, adapted to the tiny model
AI_TOOLKIT = """
job: extension
config:
  name: "my_first_lora_v1"
  process:
    - type: 'sd_trainer'
      training_folder: "output"
      device: cuda:0
      trigger_word: "p3r5on"
      network:
        type: "lora"
        linear: 4
        linear_alpha: 2
      save:
        dtype: float16
        save_every: 250
        max_step_saves_to_keep: 4
      datasets:
        - folder_path: "/path/to/images/folder"
          caption_ext: "txt"
          caption_dropout_rate: 0.05
          shuffle_tokens: false
          cache_latents_to_disk: true
          resolution: [ 64 ]
      train:
        batch_size: 2
        steps: 5
        gradient_accumulation_steps: 1
        train_unet: true
        train_text_encoder: false
        gradient_checkpointing: false
        noise_scheduler: "ddpm"
        optimizer: "adamw8bit"
        lr: 1e-4
        dtype: bf16
      model:
        name_or_path: "runwayml/stable-diffusion-v1-5"
      sample:
        sampler: "ddpm"
        sample_every: 250
        width: 64
        height: 64
        prompts:
          - "[trigger] holding a sign that says 'I LOVE PROMPTS!'"
        neg: "blurry"
        seed: 42
        walk_seed: true
        guidance_scale: 7
        sample_steps: 4
meta:
  name: "[name]"
  version: '1.0'
"""


def test_ai_toolkit_yaml_maps_and_steps_become_whole_epochs(tmp_path: Path, make_service) -> None:  # noqa: F811
    mapped = parse_config(AI_TOOLKIT)
    assert mapped.params == {
        "network_dim": 4, "network_alpha": 2, "caption_dropout_rate": 0.05, "shuffle_caption": False,
        "resolution": 64, "batch_size": 2, "max_train_steps": 5, "text_encoder_lr": 0.0,
        "gradient_checkpointing": False, "optimizer": "adamw8bit", "unet_lr": 1e-4,
        "sample_prompts": ["[trigger] holding a sign that says 'I LOVE PROMPTS!' --n blurry --w 64 --h 64 --d 42 "
                           "--l 7 --s 4"],
    }
    assert mapped.trigger_words == ["p3r5on"]
    assert {"save.save_every", "training_folder", "model.name_or_path", "datasets.folder_path"} <= set(mapped.ignored)
    with pytest.raises(InvalidRequest) as err:
        parse_ai_toolkit(AI_TOOLKIT.replace('noise_scheduler: "ddpm"', 'noise_scheduler: "flowmatch"')
                         .replace("lr: 1e-4", "lr: 1e-4\n        ema_config: {use_ema: true}"))
    assert err.value.details["options"] == ["train.ema_config.use_ema", "train.noise_scheduler"]

    service = make_service()
    row = service.submit("alice", toy_zip(tmp_path / "a.zip"), Submission(
        "sd1", real_person=False, config=AI_TOOLKIT, params={"optimizer": "adamw", "seed": 1, "repeats": 1}))
    assert (row.steps_per_epoch, row.epochs, row.total_steps) == (2, 3, 6)  # 5 steps -> 3 whole epochs
    assert row.trigger_words == ["p3r5on"] and row.params["network_dim"] == 4

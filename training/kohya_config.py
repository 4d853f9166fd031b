"""kohya sd-scripts configuration: its option names, its `--config_file` TOML and its dataset TOML,
mapped onto the service's training parameters.

Every option a kohya user may send falls in exactly one of three groups:
- mapped: it has a parameter here (`max_train_epochs` -> `epochs`, `optimizer_type` -> `optimizer`, ...);
  the service's own names are accepted as well;
- managed by the service: paths, output names, data-loader and attention settings and the like,
  which the service decides for every job; accepted, and listed back to the user as `ignored`;
- anything else, or a mapped option with a value the service does not support: refused with code
  `unsupported_training_options` and the list of every such option, never silently dropped.

Files are parsed with `tomllib` (the standard library); nothing in them is executed or fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tomllib

from genserve.core.errors import InvalidRequest
from training.params import TrainingRequest

MAX_CONFIG_BYTES = 256 << 10

# kohya's name -> the service's
ALIASES = {
    "max_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "batch_size": "batch_size",  # dataset TOML
    "num_repeats": "repeats",
    "optimizer_type": "optimizer",
}
OUR_NAMES = frozenset(TrainingRequest.model_fields)

# decided by the service for every job: accepted and reported back as ignored
MANAGED = {
    "pretrained_model_name_or_path": "the base model follows the job's family",
    "output_dir": "the service stores the outputs",
    "output_name": "the job's name is the file name",
    "logging_dir": "logs are the service's",
    "log_prefix": "logs are the service's",
    "log_with": "logs are the service's",
    "train_data_dir": "the uploaded zip is the dataset",
    "image_dir": "the uploaded zip is the dataset",
    "dataset_config": "send the dataset TOML itself",
    "caption_extension": ".txt and .caption captions are both read",
    "save_model_as": "LoRAs are saved as safetensors",
    "save_precision": "LoRAs are saved in float32",
    "xformers": "attention follows the GPU",
    "sdpa": "attention follows the GPU",
    "mem_eff_attn": "attention follows the GPU",
    "max_data_loader_n_workers": "data loading is the service's",
    "persistent_data_loader_workers": "data loading is the service's",
    "cache_latents_to_disk": "latents are cached in memory",
    "vae_batch_size": "latents are encoded one image at a time",
    "lowram": "memory settings follow the GPU",
    "highvram": "memory settings follow the GPU",
    "no_half_vae": "the VAE always runs in float32",
    "sample_sampler": "samples use the generator's default sampler",
    "min_bucket_reso": "buckets follow the resolution",
    "max_bucket_reso": "buckets follow the resolution",
    "bucket_reso_steps": "buckets use the service's step",
    "bucket_no_upscale": "images are never upscaled",
    "save_state": "every epoch is checkpointed for resume",
    "save_last_n_epochs": "epoch files are kept for the configured period",
    "network_module": "mapped through network_args",
}
# options with the one value the service runs; any other value is unsupported
FIXED = {
    "save_model_as": {"safetensors"},
    "gradient_accumulation_steps": {1},
    "clip_skip": {1},
    "max_grad_norm": {1},
    "network_module": {"networks.lora", "lycoris.kohya"},
    "caption_extension": {".txt", ".caption", "txt", "caption"},
    "v2": {False},
    "v_parameterization": {False},
    "flip_aug": {False},
    "color_aug": {False},
    "random_crop": {False},
    "is_reg": {False},
    "full_fp16": {False},
    "full_bf16": {False},
    "network_train_text_encoder_only": {False},
}
OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}


@dataclass
class MappedConfig:
    params: dict[str, Any] = field(default_factory=dict)  # the service's names
    trigger_words: list[str] = field(default_factory=list)  # the dataset's class_tokens
    ignored: dict[str, str] = field(default_factory=dict)  # option -> why the service decides it


class _Collector:
    def __init__(self) -> None:
        self.out = MappedConfig()
        self.unsupported: dict[str, str] = {}

    def refuse(self, name: str, why: str) -> None:
        self.unsupported[name] = why


def _flatten_config_file(data: dict[str, Any]) -> dict[str, Any]:
    """kohya's `--config_file`: top-level keys, and the keys of any table (its sections are only labels)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _resolution(value: Any) -> int:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    sides = {int(p) for p in parts}
    if len(sides) != 1 or len(parts) > 2:
        raise ValueError("only square resolutions (one number) are supported; buckets keep the aspect ratios")
    return sides.pop()


def _network_args(values: Any, c: _Collector) -> None:
    items = values if isinstance(values, list) else [values]
    for item in items:
        key, sep, raw = str(item).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            c.refuse(f"network_args:{item}", "expected key=value")
        elif key in ("conv_dim", "conv_alpha"):
            try:
                c.out.params[key] = int(raw) if key == "conv_dim" else float(raw)
            except ValueError:
                c.refuse(f"network_args:{key}", f"wants a number, got {raw!r}")
        elif key == "algo" and raw.lower() in ("lora", "locon"):
            if raw.lower() == "locon":
                c.out.params.setdefault("network_type", "locon")
        elif key == "dora_wd" and raw.lower() in ("true", "1"):
            c.out.params["network_type"] = "dora"
        else:
            c.refuse(f"network_args:{key}", "not a supported network argument (conv_dim, conv_alpha, algo, dora_wd)")


def _allowed_value(value: Any, allowed: set) -> bool:
    if isinstance(value, str):
        value = value.lower()
    try:
        return value in allowed and type(value) is not list
    except TypeError:  # unhashable
        return False


def _one(name: str, value: Any, c: _Collector) -> None:
    """Map one option (kohya's name or ours)."""
    if name in FIXED and not _allowed_value(value, FIXED[name]):
        c.refuse(name, f"only {sorted(map(str, FIXED[name]))} is supported")
        return
    if name in MANAGED:
        c.out.ignored[name] = MANAGED[name]
        return
    if name in FIXED:
        return  # the value the service runs anyway
    if name == "network_args":
        _network_args(value, c)
        return
    if name == "learning_rate":
        c.out.params.setdefault("unet_lr", value)  # kohya: unet_lr, when given, wins
        return
    if name == "network_train_unet_only":
        if value:
            c.out.params["text_encoder_lr"] = 0.0
        return
    if name == "class_tokens":
        c.out.trigger_words.extend(w.strip() for w in str(value).split(",") if w.strip())
        return
    if name == "sample_prompts":
        if isinstance(value, str):
            value = value.splitlines() if "\n" in value or not value.strip().lower().endswith((".txt", ".toml")) \
                else None
        if value is None:
            c.refuse(name, "a prompt file path: send the prompts themselves (the CLI reads the file for you)")
            return
        c.out.params[name] = [str(v) for v in value if str(v).strip()]
        return
    target = ALIASES.get(name, name)
    if target not in OUR_NAMES:
        c.refuse(name, "train by epochs (max_train_epochs)" if name == "max_train_steps" else "not a supported option")
        return
    try:
        if target == "optimizer":
            key = str(value).lower().replace("_", "")
            if key not in OPTIMIZERS:
                raise ValueError(f"supported: {sorted(OPTIMIZERS)}")
            value = OPTIMIZERS[key]
        elif target == "resolution":
            value = _resolution(value)
        elif target == "lr_warmup_steps" and isinstance(value, float):
            if value < 1:
                raise ValueError("give the warm-up as a number of steps, not a ratio")
            value = int(value)
        elif target == "text_encoder_lr" and isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError("one learning rate for all text encoders")
            value = value[0]
    except (TypeError, ValueError) as exc:
        c.refuse(name, str(exc))
        return
    if name == "unet_lr":
        c.out.params["unet_lr"] = value
        return
    c.out.params[target] = value


def map_options(options: dict[str, Any], c: _Collector | None = None,
                skip: frozenset[str] = frozenset()) -> MappedConfig:
    """Map a flat dict of options (kohya's names or ours); refuses unsupported ones all at once.
    Options named in `skip` (given explicitly elsewhere) are passed over."""
    own = c is None
    c = c or _Collector()
    # unet_lr before learning_rate, so that either order gives kohya's precedence
    for name in sorted(options, key=lambda n: n != "unet_lr"):
        if name not in skip:
            _one(name, options[name], c)
    if own:
        _raise_if_unsupported(c)
    return c.out


def _raise_if_unsupported(c: _Collector) -> None:
    if c.unsupported:
        names = sorted(c.unsupported)
        raise InvalidRequest(f"unsupported training options: {', '.join(names)}", code="unsupported_training_options",
                             details={"options": names, "reasons": c.unsupported})


def _load_toml(text: str | bytes, what: str) -> dict[str, Any]:
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"the {what} is larger than {MAX_CONFIG_BYTES} bytes", code="invalid_training_config")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"the {what} is not valid TOML: {exc}", code="invalid_training_config") from exc


def _dataset_options(data: dict[str, Any], c: _Collector) -> dict[str, Any]:
    """kohya's dataset TOML ([general] -> [[datasets]] -> [[datasets.subsets]]), flattened; one dataset
    with one subset (the uploaded zip), lower levels overriding higher ones as kohya does."""
    flat = dict(data.get("general") or {})
    for key in data:
        if key not in ("general", "datasets"):
            c.refuse(key, "not a dataset TOML section ([general], [[datasets]])")
    datasets = data.get("datasets") or []
    if len(datasets) > 1:
        c.refuse("datasets", "one dataset per job (the uploaded zip)")
    for dataset in datasets[:1]:
        subsets = dataset.get("subsets") or []
        if len(subsets) > 1:
            c.refuse("datasets.subsets", "one subset per job (the uploaded zip)")
        flat.update({k: v for k, v in dataset.items() if k != "subsets"})
        for subset in subsets[:1]:
            flat.update(subset)
    return flat


def parse_kohya(config_toml: str | bytes | None = None, dataset_toml: str | bytes | None = None,
                skip: frozenset[str] = frozenset()) -> MappedConfig:
    """A kohya `--config_file` TOML and/or dataset TOML, mapped; every unsupported option refused at once.
    Options named in `skip` are given explicitly elsewhere (e.g. the prompts of a `sample_prompts` file)."""
    c = _Collector()
    if config_toml:
        map_options(_flatten_config_file(_load_toml(config_toml, "training config")), c, skip)
    if dataset_toml:  # after: the dataset config's values win over the training config's, as in kohya
        map_options(_dataset_options(_load_toml(dataset_toml, "dataset config"), c), c, skip)
    _raise_if_unsupported(c)
    return c.out


def sample_prompts_file(config_toml: str | bytes) -> str | None:
    """The `sample_prompts` file a kohya config names (for a client to read and send inline), if any."""
    value = _flatten_config_file(_load_toml(config_toml, "training config")).get("sample_prompts")
    if isinstance(value, str) and "\n" not in value and value.strip().lower().endswith((".txt", ".toml")):
        return value.strip()
    return None

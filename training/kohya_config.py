"""kohya sd-scripts configuration: its option names, its `--config_file` TOML and its dataset TOML,
mapped onto the service's training parameters.

Every option a kohya user may send falls in exactly one of three groups:
- mapped: it has a parameter here (`max_train_epochs` -> `epochs`, `optimizer_type` -> `optimizer`, ...);
  the service's own names are accepted as well;
- managed by the service: paths, output names, data-loader and attention settings and the like,
  which the service decides for every job; accepted, and listed back to the user as `ignored`;
- anything else, or a mapped option with a value the service does not support: refused with code
  `unsupported_training_options` and the list of every such option, never silently dropped.

`max_train_steps` (and ai-toolkit's `steps`) becomes the whole number of epochs that covers it.
Files are parsed with `tomllib` / `yaml.safe_load` (the standard library); nothing in them is executed or fetched.
"""

from __future__ import annotations

import re
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
        c.refuse(name, "not a supported option")
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


# ------------------------------------------------------------------------------------ ai-toolkit

# ai-toolkit section.key -> kohya/our option name (then mapped as above)
_AI_TOOLKIT = {
    "network.linear": "network_dim",
    "network.linear_alpha": "network_alpha",
    "network.conv": "conv_dim",
    "network.conv_alpha": "conv_alpha",
    "train.batch_size": "batch_size",
    "train.steps": "max_train_steps",
    "train.lr": "learning_rate",
    "train.optimizer": "optimizer_type",
    "train.lr_scheduler": "lr_scheduler",
    "train.gradient_checkpointing": "gradient_checkpointing",
    "train.gradient_accumulation_steps": "gradient_accumulation_steps",
    "train.min_snr_gamma": "min_snr_gamma",
    "train.noise_offset": "noise_offset",
    "train.seed": "seed",
    "datasets.caption_dropout_rate": "caption_dropout_rate",
    "datasets.shuffle_tokens": "shuffle_caption",
    "datasets.keep_tokens": "keep_tokens",
    "datasets.num_repeats": "num_repeats",
}
_AI_TOOLKIT_MANAGED = {
    "training_folder", "device", "save.dtype", "save.max_step_saves_to_keep", "datasets.folder_path",
    "datasets.caption_ext", "datasets.cache_latents_to_disk", "datasets.cache_latents", "model.name_or_path",
    "sample.sampler", "sample.walk_seed", "train.skip_first_sample", "train.disable_sampling", "train.train_unet",
    "train.noise_scheduler", "logging.log_every", "logging.use_wandb", "performance_log_every", "train.dtype",
}
_AI_TOOLKIT_FIXED = {"train.train_unet": {True}, "train.noise_scheduler": {"ddpm"}, "model.is_flux": {False},
                     "model.is_v2": {False}, "model.is_v3": {False}, "model.is_xl": {True, False},
                     "model.quantize": {False}, "save.push_to_hub": {False}, "train.ema_config.use_ema": {False},
                     "network.type": {"lora", "locon", "lycoris"}}
_YAML_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_STEPS_NOTE = "saves and samples follow epochs (save_every_n_epochs / sample_every_n_epochs)"


def _sample_lines(sample: dict[str, Any]) -> list[str]:
    """ai-toolkit's `sample:` block as kohya sample-prompt lines (its shared settings on each line)."""
    shared = []
    for key, flag in (("neg", "n"), ("width", "w"), ("height", "h"), ("seed", "d"), ("guidance_scale", "l"),
                      ("sample_steps", "s")):
        if sample.get(key) not in (None, ""):
            shared.append(f"--{flag} {sample[key]}")
    return [" ".join([str(p), *shared]) for p in sample.get("prompts") or []]


def parse_ai_toolkit(text: str | bytes) -> MappedConfig:
    """An ai-toolkit job YAML (`config.process[0]` of type `sd_trainer`), mapped like a kohya config."""
    import yaml

    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidRequest(f"the config is larger than {MAX_CONFIG_BYTES} bytes", code="invalid_training_config")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"the config is not valid YAML: {exc}", code="invalid_training_config") from exc
    processes = ((data or {}).get("config") or {}).get("process") if isinstance(data, dict) else None
    if not isinstance(processes, list) or len(processes) != 1 or not isinstance(processes[0], dict):
        raise InvalidRequest("an ai-toolkit config needs exactly one entry under config.process",
                             code="invalid_training_config")
    c = _Collector()
    process = dict(processes[0])
    if process.pop("type", None) != "sd_trainer":
        c.refuse("type", "only the sd_trainer process is supported")
    options: dict[str, Any] = {}
    if trigger := process.pop("trigger_word", None):
        c.out.trigger_words.append(str(trigger))
    datasets = process.pop("datasets", None) or []
    if len(datasets) > 1:
        c.refuse("datasets", "one dataset per job (the uploaded zip)")
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and prefix not in ("sample",):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, str) and _YAML_FLOAT.match(value.strip()):
            flat[prefix] = float(value)  # YAML 1.1 reads `1e-4` as a string
        else:
            flat[prefix] = value

    walk("", process)
    for key, value in (datasets[0] if datasets else {}).items():
        flat[f"datasets.{key}"] = value
    for key, value in flat.items():
        if key in _AI_TOOLKIT_FIXED and not _allowed_value(value, _AI_TOOLKIT_FIXED[key]):
            c.refuse(key, f"only {sorted(map(str, _AI_TOOLKIT_FIXED[key]))} is supported")
        elif key == "sample":
            options["sample_prompts"] = _sample_lines(value or {})
            if (value or {}).get("sample_every") is not None:
                c.out.ignored["sample.sample_every"] = _STEPS_NOTE
        elif key == "save.save_every":
            c.out.ignored[key] = _STEPS_NOTE
        elif key == "network.type":
            if str(value).lower() in ("locon", "lycoris"):
                options["network_type"] = "locon"
        elif key == "datasets.resolution":
            options["resolution"] = value if not isinstance(value, list) or len(value) != 1 else value[0]
        elif key == "train.train_text_encoder":
            if not value:
                options["network_train_unet_only"] = True
            else:
                options["text_encoder_lr"] = (flat.get("train.lr") or 1e-4)
        elif key in _AI_TOOLKIT:
            options[_AI_TOOLKIT[key]] = value
        elif key in _AI_TOOLKIT_MANAGED or key.startswith(("model.", "logging.", "train.ema_config.")):
            if key not in _AI_TOOLKIT_FIXED:
                c.out.ignored[key] = "decided by the service"
        else:
            c.refuse(key, "not a supported option")
    map_options(options, c)
    _raise_if_unsupported(c)
    return c.out


def parse_config(config: str | bytes | None, dataset_config: str | bytes | None = None,
                 skip: frozenset[str] = frozenset()) -> MappedConfig:
    """A kohya TOML (with its dataset TOML) or an ai-toolkit YAML, told apart by their syntax."""
    if config:
        raw = config.decode("utf-8", "replace") if isinstance(config, bytes) else config
        try:
            tomllib.loads(raw)
        except tomllib.TOMLDecodeError:
            import yaml

            try:
                data = yaml.safe_load(raw)
            except yaml.YAMLError:
                data = None
            if isinstance(data, dict) and "config" in data:
                if dataset_config:
                    raise InvalidRequest("an ai-toolkit config carries its own datasets; send no dataset_config",
                                         code="invalid_training_config") from None
                return parse_ai_toolkit(raw)
    return parse_kohya(config, dataset_config, skip)

"""Tiny random-weight SD1 and SDXL models with the real architectures, built offline from a seed.

They stand in for real checkpoints wherever no model hub is reachable (tests, local runs): the same
pipeline classes, the real CLIP BPE tokenizer, the same on-disk formats (diffusers folder and
original-layout single file) and the mandatory safety embeddings, at a size that runs in
milliseconds on a CPU. The same seed always gives bit-identical files.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import ConfigMixin
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from genserve.engine.loading import disable_progress_bars
from genserve.engine.single_file import pipeline_to_ldm, vae_to_ldm

FAMILIES = ("sd1", "sdxl")
MANIFEST_VERSION = 1
BPE_VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN_ID, EOS_TOKEN_ID = 49406, 49407

# hidden sizes of the text encoders; SDXL's two differ on purpose: with equal sizes the single-file
# loader cannot tell CLIP-L from OpenCLIP and silently loads the wrong weights into text_encoder_2
SD1_TEXT_HIDDEN = 32
SDXL_TEXT_HIDDEN = (32, 48)
SDXL_PROJECTION_DIM = 32
SDXL_TIME_EMBED_DIM = 8
# safety embedding vectors per kind (the general negative embedding is the larger one, as in practice)
SAFETY_EMBEDDING_VECTORS = {"general": 2, "minor": 1}
SAFETY_EMBEDDING_FILES = {
    "general": "{family}-safe-neg.safetensors",
    "minor": "{family}-safe-minor.safetensors",
}


@dataclass(frozen=True)
class TinyModel:
    """Where one family's tiny model lives on disk (layout of `configs/models.yaml`)."""

    family: str
    root: Path
    diffusers_dir: Path
    single_file: Path
    config_dir: Path
    embeddings: dict[str, Path]


# ---------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The real 49,408-token CLIP vocabulary and its BPE merges, built like OpenAI's SimpleTokenizer."""
    lines = gzip.decompress(BPE_VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    seen = set(tokens)
    for first, second in merges:
        token = first + second
        if token not in seen:
            tokens.append(token)
            seen.add(token)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A fresh CLIP tokenizer (fresh because textual inversion adds tokens to it)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


# ---------------------------------------------------------------------------------------------- models


def _text_config(hidden: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        projection_dim=projection_dim or hidden,
    )


def _vae() -> AutoencoderKL:
    """Two levels: the latent is half the image size (vae_scale_factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )


def _scheduler() -> EulerDiscreteScheduler:
    """Euler with the SD1/SDXL training betas."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _build_sd1() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=SD1_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(SD1_TEXT_HIDDEN)),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_unet_config() -> dict:
    """The tiny SDXL pipeline's UNet: SDXL's layout (text-time conditioning, cross-attention in the
    lower block) at toy width."""
    hidden_l, hidden_g = SDXL_TEXT_HIDDEN
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=hidden_l + hidden_g,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        # six micro-conditioning numbers (original size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        norm_num_groups=32,
    )


def _build_sdxl() -> StableDiffusionXLPipeline:
    hidden_l, hidden_g = SDXL_TEXT_HIDDEN
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(hidden_l)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(hidden_g, SDXL_PROJECTION_DIM)),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's OpenCLIP tokenizer pads with "!"
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


_BUILDERS = {"sd1": _build_sd1, "sdxl": _build_sdxl}


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def build_tiny_pipeline(family: str, seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """An in-memory tiny pipeline; the global torch RNG is left as it was."""
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[family]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_vae(path: Path, seed: int = 1, layout: str = "ldm") -> Path:
    """A stand-alone VAE file for the tiny models of either family (they share one VAE architecture),
    drawn from `seed` (the checkpoints' own VAEs come from their build seed, so another seed decodes
    differently). `layout` "ldm" writes the keys A1111/Civitai VAE files have, "diffusers" diffusers'."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"vae/{seed}".encode()))
        vae = _vae()
    tensors = vae_to_ldm(vae, prefix="") if layout == "ldm" else vae.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def build_safety_embeddings(family: str, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The mandatory safety textual-inversion tensors per kind, in the file layout each family uses.

    SD1: A1111-style `{"emb_params": [n, 768]}`; SDXL: civitai's `{"clip_l": [n, 768], "clip_g": [n, 1280]}`
    (tiny widths here). Drawn at the scale of the token embeddings so they really move the prompt.
    """
    _check_family(family)
    widths = {
        "sd1": {"emb_params": SD1_TEXT_HIDDEN},
        "sdxl": dict(zip(("clip_l", "clip_g"), SDXL_TEXT_HIDDEN, strict=True)),
    }
    out = {}
    for kind, vectors in SAFETY_EMBEDDING_VECTORS.items():
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{family}/{kind}".encode()))
        out[kind] = {
            key: torch.randn(vectors, width, generator=generator) * 0.02
            for key, width in widths[family].items()
        }
    return out


# ---------------------------------------------------------------------------------------------- on disk


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_config_only(pipe, config_dir: Path) -> None:
    """model_index.json, every component's config, tokenizers and scheduler: the `config=` folder that
    `from_single_file` needs to rebuild the architecture offline. No weights."""
    pipe.save_config(config_dir)
    for name, component in pipe.components.items():
        if component is None:
            continue
        target = config_dir / name
        if isinstance(component, ConfigMixin):  # diffusers models and schedulers
            component.save_config(target)
        elif isinstance(component, PreTrainedModel):
            component.config.save_pretrained(target)
        elif isinstance(component, PreTrainedTokenizerBase):
            component.save_pretrained(target)
        else:
            raise TypeError(f"no config-only form for pipeline component {name}: {type(component).__name__}")


def _tiny_model(models_dir: Path, family: str) -> TinyModel:
    root = models_dir / f"tiny-{family}"
    return TinyModel(
        family=family,
        root=root,
        diffusers_dir=root / "diffusers",
        single_file=root / f"tiny-{family}.safetensors",
        config_dir=root / "config",
        embeddings={
            kind: models_dir / "embeddings" / name.format(family=family)
            for kind, name in SAFETY_EMBEDDING_FILES.items()
        },
    )


def _manifest_path(model: TinyModel) -> Path:
    return model.root / "manifest.json"


def _built_files(model: TinyModel) -> list[Path]:
    files = [p for p in model.root.rglob("*") if p.is_file() and p.name != "manifest.json"]
    return sorted(files) + [model.embeddings[kind] for kind in sorted(model.embeddings)]


def _is_built(model: TinyModel, models_dir: Path, seed: int) -> bool:
    """True when the manifest says this seed was built and every recorded file still has its hash."""
    try:
        manifest = json.loads(_manifest_path(model).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("seed") != seed:
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (models_dir / rel).is_file() and _sha256(models_dir / rel) == sha for rel, sha in files.items()
    )


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary sibling then rename, so readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_family(model: TinyModel, models_dir: Path, seed: int) -> None:
    disable_progress_bars()
    pipe = build_tiny_pipeline(model.family, seed)
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".staging-{model.root.name}."))
    try:
        pipe.save_pretrained(staging / model.diffusers_dir.name, safe_serialization=True)
        save_file(pipeline_to_ldm(pipe), staging / model.single_file.name, metadata={"format": "pt"})
        _save_config_only(pipe, staging / model.config_dir.name)
        if model.root.exists():
            shutil.rmtree(model.root)
        os.replace(staging, model.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    for kind, tensors in build_safety_embeddings(model.family, seed).items():
        _write_atomically(
            model.embeddings[kind], lambda p, t=tensors: save_file(t, p, metadata={"format": "pt"})
        )

    manifest = {
        "version": MANIFEST_VERSION,
        "family": model.family,
        "seed": seed,
        "files": {str(p.relative_to(models_dir)): _sha256(p) for p in _built_files(model)},
    }
    _write_atomically(
        _manifest_path(model), lambda p: p.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    )


@contextmanager
def _build_lock(models_dir: Path) -> Iterator[None]:
    """One builder per models dir at a time: several processes may ask for the models at start-up."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with (models_dir / ".tiny-models.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_tiny_models(
    models_dir: Path, seed: int = 0, families: Iterable[str] = FAMILIES, force: bool = False
) -> dict[str, TinyModel]:
    """Build (or reuse) the tiny models of `families` under `models_dir`, keyed by family.

    A family is rebuilt only when `force` is set or its manifest does not match `seed` and the files
    on disk; otherwise the existing build is returned as is.
    """
    models_dir = Path(models_dir).resolve()
    families = tuple(families)
    for family in families:
        _check_family(family)
    models = {family: _tiny_model(models_dir, family) for family in families}
    with _build_lock(models_dir):
        for model in models.values():
            if force or not _is_built(model, models_dir, seed):
                _build_family(model, models_dir, seed)
    return models

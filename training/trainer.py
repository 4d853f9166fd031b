"""PEFT LoRA training of SD1.x / SDXL with accelerate, in the spirit of kohya's train_network.

Everything random in a step (caption shuffle and dropout, the latent sample, noise, noise offset,
timesteps) is drawn from one CPU generator whose state is checkpointed, and the batch order of an
epoch is a function of (seed, epoch): a job resumed from an epoch checkpoint replays exactly the
steps an uninterrupted job would have run. Step and epoch are counted here and stored in the
checkpoint, never inferred from file names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image

from genserve.core import metrics
from genserve.core.errors import GenserveError
from genserve.engine.loading import load_pipeline
from safety.embeddings import SafetyEmbeddings
from training.adapters import TEXT_ENCODER_TARGETS as TEXT_ENCODER_TARGETS  # re-exported: bench/ imports
from training.adapters import UNET_TARGETS as UNET_TARGETS  # the targets from here
from training.adapters import adapter_weights, add_lora_adapters, load_adapter_weights
from training.buckets import assign_bucket, epoch_batches, make_buckets, steps_per_epoch
from training.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from training.conditioning import encode_prompts, sdxl_added_conditioning, sdxl_time_ids
from training.config import SampleSettings
from training.intake import KeptImage, load_manifest
from training.latents import bucket_pixels, vae_latents
from training.objective import denoising_loss, draw_noise, draw_timesteps
from training.optimizers import build_lr_scheduler, build_optimizer, param_groups
from training.params import ResolvedParams
from training.previews import preview_prompts, render_previews
from training.rng_state import capture_rng_state, restore_rng_state
from training.sample_prompts import parse_sample_prompts

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


class TrainingDiverged(GenserveError):
    code = "training_diverged"
    http_status = 500


@dataclass(frozen=True)
class BaseModelRef:
    """Where the base checkpoint is (see genserve.engine.loading.load_pipeline)."""

    family: str
    path: Path
    format: str = "diffusers"
    config_dir: Path | None = None


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int
    epoch: int  # epochs completed
    loss: float
    eta_s: float | None


@dataclass
class TrainHooks:
    """How the trainer talks to whoever runs it; every hook is optional."""

    on_progress: Callable[[Progress], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_checkpoint: Callable[[Path, int, int], None] | None = None  # folder, step, epoch
    on_sample: Callable[[int, int, str, Image.Image], None] | None = None  # epoch, index, prompt, image


@dataclass
class TrainResult:
    completed: bool  # False when stopped by `should_stop`
    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Item:
    image: KeptImage
    bucket: tuple[int, int]


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """Half precision is a CUDA feature; on CPU training always runs in full precision."""
    if device.type != "cuda":
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def plan_steps(images: list[KeptImage], params: ResolvedParams) -> tuple[int, int]:
    """(steps per epoch, total steps) for a dataset; the quote and the trainer use the same numbers."""
    buckets = make_buckets(params.resolution, params.bucket_step, params.enable_bucket)
    assigned = [assign_bucket(i.width, i.height, buckets) for i in images]
    per_epoch = steps_per_epoch(assigned, params.repeats, params.batch_size)
    return per_epoch, per_epoch * params.epochs


class LoraTrainer:
    """One training run: base pipeline + LoRA adapters + the prepared dataset."""

    def __init__(
        self,
        base: BaseModelRef,
        dataset_dir: str | Path,
        params: ResolvedParams,
        *,
        trigger_words: list[str] | None = None,
        work_dir: str | Path,
        samples: SampleSettings | None = None,
        safety: SafetyEmbeddings | None = None,
        device: str | None = None,
    ):
        self.base = base
        self.safety = safety
        self.params = params
        self.trigger_words = list(trigger_words or [])
        self.dataset_dir = Path(dataset_dir)
        self.work_dir = Path(work_dir)
        self.samples = samples
        on_cpu = device == "cpu" or not torch.cuda.is_available()
        mixed = resolve_mixed_precision(params.mixed_precision, torch.device("cpu" if on_cpu else "cuda"))
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=on_cpu)
        self.device = self.accelerator.device
        self.mixed_precision = mixed
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)

        torch.manual_seed(params.seed)
        self.generator = torch.Generator().manual_seed(params.seed)
        self._load_models()
        self._load_dataset()
        self._build_optimizer()
        self.step = 0
        self.epoch = 0

    # ------------------------------------------------------------------------------------ set-up

    def _load_models(self) -> None:
        p = self.params
        pipe = load_pipeline(self.base.family, self.base.path, self.base.format, self.base.config_dir,
                             torch_dtype=self.weight_dtype, device=str(self.device))
        self.pipe = pipe
        self.is_sdxl = self.base.family == "sdxl"
        self.unet = pipe.unet
        self.vae = pipe.vae
        if self.vae.dtype != torch.float32:
            self.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16; it only encodes the dataset
        if self.safety is not None:  # sample previews carry the generator's mandatory negative embeddings
            # loading resizes the token embeddings with a random draw (then overwritten): keep it off the
            # seeded RNG so a run trains the same weights with or without previews
            with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
                self.safety.load_into(pipe)
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if self.is_sdxl else [])
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.is_sdxl else [])
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(torch.float32)

        self.trained_modules = add_lora_adapters(self.unet, self.text_encoders, p, self.weight_dtype)
        if p.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if p.train_text_encoder:
                for te in self.text_encoders:
                    te.gradient_checkpointing_enable()

    def _load_dataset(self) -> None:
        p = self.params
        report = load_manifest(self.dataset_dir)
        buckets = make_buckets(p.resolution, p.bucket_step, p.enable_bucket)
        self.items = [_Item(img, assign_bucket(img.width, img.height, buckets)) for img in report.images]
        self.steps_per_epoch, self.total_steps = plan_steps(report.images, p)
        self.latent_cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if p.cache_latents:
            with torch.no_grad():
                self.latent_cache = [self._encode_dist(self._pixels(i)[None]) for i in range(len(self.items))]
                self.latent_cache = [(m[0].cpu(), s[0].cpu()) for m, s in self.latent_cache]

    def _build_optimizer(self) -> None:
        groups = param_groups(self.unet, self.text_encoders, self.params)
        optimizer = build_optimizer(groups, self.params)
        self.lr_scheduler = build_lr_scheduler(optimizer, self.params, self.total_steps)
        prepared = self.accelerator.prepare(*self.trained_modules.values(), optimizer)
        self.optimizer = prepared[-1]
        self.trainable = [q for group in groups for q in group["params"]]

    # ------------------------------------------------------------------------------------ data

    def _pixels(self, index: int) -> torch.Tensor:
        """Pixels in [-1, 1], fitted to the item's bucket."""
        item = self.items[index]
        return bucket_pixels(self.dataset_dir / item.image.file, item.bucket)

    def _time_ids(self, index: int) -> list[int]:
        """SDXL micro-conditioning (original h, w, crop top, left, target h, w), as `fit_to_bucket` crops."""
        item = self.items[index]
        return sdxl_time_ids(item.image.width, item.image.height, item.bucket)

    def _encode_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return dist.mean, dist.std

    def _latents(self, indices: list[int]) -> torch.Tensor:
        """A sample of each image's latent distribution, drawn from the checkpointed generator."""
        if self.latent_cache is not None:
            mean = torch.stack([self.latent_cache[i][0] for i in indices])
            std = torch.stack([self.latent_cache[i][1] for i in indices])
        else:
            with torch.no_grad():  # one image at a time, as the cache encodes: the same numbers either way
                dists = [self._encode_dist(self._pixels(i)[None]) for i in indices]
            mean = torch.cat([m for m, _ in dists]).cpu()
            std = torch.cat([s for _, s in dists]).cpu()
        sample = mean + std * torch.randn(mean.shape, generator=self.generator)
        return vae_latents(sample, self.vae.config).to(self.device, self.weight_dtype)

    def caption_for(self, image: KeptImage, *, augment: bool = True) -> str:
        """Trigger words first, then the caption's tags (shuffled after `keep_tokens`, or dropped)."""
        p = self.params
        tags = [t.strip() for t in (image.caption or "").split(",") if t.strip()]
        if augment and p.shuffle_caption and len(tags) > p.keep_tokens + 1:
            head, tail = tags[: p.keep_tokens], tags[p.keep_tokens :]
            tags = head + [tail[i] for i in torch.randperm(len(tail), generator=self.generator).tolist()]
        if augment and p.caption_dropout_rate > 0:
            if torch.rand(1, generator=self.generator).item() < p.caption_dropout_rate:
                return ""
        return ", ".join(self.trigger_words + tags)

    # ------------------------------------------------------------------------------------ one step

    def _loss(self, indices: list[int], *, augment: bool = True) -> torch.Tensor:
        p = self.params
        captions = [self.caption_for(self.items[i].image, augment=augment) for i in indices]
        latents = self._latents(indices)
        noise = draw_noise(latents.shape, self.generator, p.noise_offset if augment else 0.0)
        timesteps = draw_timesteps(self.noise_scheduler, latents.shape[0], self.generator)
        noise = noise.to(self.device, latents.dtype)
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        with self.accelerator.autocast():
            embeds, pooled = encode_prompts(captions, self.tokenizers, self.text_encoders, self.device,
                                            sdxl=self.is_sdxl, with_grad=p.train_text_encoder)
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = sdxl_added_conditioning(
                pooled, [self._time_ids(i) for i in indices], self.device, self.weight_dtype)
        with self.accelerator.autocast():
            pred = self.unet(noisy, timesteps, embeds.to(self.weight_dtype), **kwargs).sample
        return denoising_loss(self.noise_scheduler, self.alphas_cumprod, pred, latents, noise, timesteps,
                              p.min_snr_gamma)

    def train_step(self, indices: list[int]) -> float:
        for module in self.trained_modules.values():
            module.train()
        loss = self._loss(indices)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.step + 1}")
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(loss.detach().item())

    # ------------------------------------------------------------------------------------ the run

    def train(self, hooks: TrainHooks | None = None) -> TrainResult:
        """Train from the current (step, epoch) to the end, or until `should_stop` says so between steps."""
        hooks = hooks or TrainHooks()
        result = TrainResult(completed=False, step=self.step, epoch=self.epoch)
        started, steps_here = time.monotonic(), 0
        while self.epoch < self.params.epochs:
            batches = epoch_batches([i.bucket for i in self.items], self.params.repeats, self.params.batch_size,
                                    self.params.seed, self.epoch)
            for batch in batches:
                if hooks.should_stop and hooks.should_stop():
                    result.step, result.epoch = self.step, self.epoch
                    return result
                loss = self.train_step(batch)
                metrics.inc("genserve_training_steps_total", family=self.base.family)
                result.losses.append(loss)
                steps_here += 1
                if hooks.on_progress:
                    per_step = (time.monotonic() - started) / steps_here
                    hooks.on_progress(Progress(self.step, self.total_steps, self.epoch, loss,
                                               per_step * (self.total_steps - self.step)))
            self.epoch += 1
            folder = self.save_checkpoint(self.work_dir / "checkpoints" / f"epoch-{self.epoch:06d}")
            if hooks.on_checkpoint:
                hooks.on_checkpoint(folder, self.step, self.epoch)
            if hooks.on_sample and self.samples and self.samples.enabled and self._samples_due():
                for index, (prompt, image) in enumerate(self.render_samples()):
                    hooks.on_sample(self.epoch, index, prompt, image)
        result.completed, result.step, result.epoch = True, self.step, self.epoch
        return result

    def _samples_due(self) -> bool:
        """Samples every `sample_every_n_epochs` epochs, and always after the last one."""
        return self.epoch % self.params.sample_every_n_epochs == 0 or self.epoch >= self.params.epochs

    def epoch_lora_due(self, epoch: int) -> bool:
        """Whether epoch `epoch`'s LoRA is delivered: every `save_every_n_epochs`, and always the last."""
        return epoch % self.params.save_every_n_epochs == 0 or epoch >= self.params.epochs

    # ------------------------------------------------------------------------------------ state

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in PEFT names, prefixed by the module they belong to (unet., text_encoder., ...)."""
        return adapter_weights(self.trained_modules, self.accelerator.unwrap_model)

    def save_checkpoint(self, folder: Path) -> Path:
        scaler = self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None
        return save_checkpoint(folder, CheckpointState(
            step=self.step,
            epoch=self.epoch,
            adapter=self.adapter_state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(),
            scaler=scaler,
            rng=capture_rng_state(self.generator),
            extra={"params": self.params.model_dump(mode="json")},
        ))

    def resume(self, folder: str | Path) -> None:
        """Continue from a checkpoint folder: weights, optimizer, LR schedule, RNG, step and epoch."""
        state = load_checkpoint(folder)
        if ResolvedParams.model_validate(state.extra.get("params") or {}) != self.params:
            raise ValueError(f"checkpoint {folder} was written with different parameters")
        load_adapter_weights(self.trained_modules, self.accelerator.unwrap_model, state.adapter, folder)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.scheduler)
        if state.scaler is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state.scaler)
        restore_rng_state(self.generator, state.rng)
        self.step, self.epoch = state.step, state.epoch

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def validation_loss(self, seed: int = 1234, samples_per_image: int = 4) -> float:
        """Loss on fixed noise and timesteps over the whole dataset (no augmentation); RNG state untouched."""
        saved = self.generator.get_state()
        self.generator.manual_seed(seed)
        for module in self.trained_modules.values():
            module.eval()
        try:
            losses = [self._loss([i] * samples_per_image, augment=False).item() for i in range(len(self.items))]
        finally:
            self.generator.set_state(saved)
        return float(sum(losses) / len(losses))

    @torch.no_grad()
    def render_samples(self) -> list[tuple[str, Image.Image]]:
        """Preview images with the adapter as trained so far, from a seed fixed per epoch."""
        cfg = self.samples
        if cfg is None:
            return []
        if self.params.sample_prompts:
            return self._render_user_samples(cfg)
        if cfg.count == 0:
            return []
        captions = [self.caption_for(item.image, augment=False) for item in self.items[: cfg.count]]
        prompts, negatives = preview_prompts(captions, cfg.count, self.safety)
        for module in self.trained_modules.values():
            module.eval()
        images = render_previews(self.pipe, self.vae, prompts, negatives, cfg, resolution=self.params.resolution,
                                 seed=self.params.seed + self.epoch, autocast=self.accelerator.autocast)
        return list(zip(prompts, images, strict=True))

    def _render_user_samples(self, cfg: SampleSettings) -> list[tuple[str, Image.Image]]:
        """The user's own kohya sample prompts, each with its size, seed, steps, CFG and negative prompt
        (the mandatory safety embeddings injected as for any preview)."""
        for module in self.trained_modules.values():
            module.eval()
        out = []
        for sp in parse_sample_prompts(self.params.sample_prompts, None, self.params.resolution):
            prompts, negatives = preview_prompts([sp.prompt], 1, self.safety, negative=sp.negative)
            settings = cfg.model_copy(update={"steps": sp.steps or cfg.steps,
                                              "guidance_scale": cfg.guidance_scale if sp.guidance_scale is None
                                              else sp.guidance_scale})
            seed = sp.seed if sp.seed is not None else self.params.seed + self.epoch
            image, = render_previews(self.pipe, self.vae, prompts, negatives, settings,
                                     resolution=self.params.resolution, width=sp.width, height=sp.height,
                                     seed=seed, autocast=self.accelerator.autocast)
            out.append((prompts[0], image))
        return out

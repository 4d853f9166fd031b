"""Integer pricing from `configs/pricing.yaml`: itemised quotes for generations and trainings.

A quote is what a job holds; what it captures comes from the same quote and what was actually
delivered (`Quote.for_delivered`, `TrainingQuote.for_progress`), so the capture can never exceed
the hold and equals it when everything was delivered. Every charge is per image (generation) or
per step and per saved epoch (training), which is what makes that split exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from genserve.core.errors import ConfigError, InvalidRequest

MILLI = 1000


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationFamilyPrice(_Strict):
    base_width: StrictInt = Field(gt=0)
    base_height: StrictInt = Field(gt=0)
    base_steps: StrictInt = Field(gt=0)
    base_millibuzz: StrictInt = Field(gt=0)


class GenerationPrices(_Strict):
    min_per_image: StrictInt = Field(1, ge=1)
    extra_resource_millibuzz: StrictInt = Field(0, ge=0)
    hires_permille: StrictInt = Field(1000, ge=0)
    # a face-fix pass, priced like a generation at the working size and the steps it runs, per face
    face_fix_permille: StrictInt = Field(1000, ge=0)
    # per image by output format (png, jpeg, webp); a format not listed costs nothing extra
    output_format_millibuzz: dict[str, StrictInt] = Field(default_factory=dict)
    # per image by workflow (txt2img, img2img, inpaint): the input's encode and the mask's compositing
    workflow_millibuzz: dict[str, StrictInt] = Field(default_factory=dict)
    families: dict[str, GenerationFamilyPrice]


class TrainingFamilyPrice(_Strict):
    millibuzz_per_step: StrictInt = Field(ge=0)
    buzz_per_saved_epoch: StrictInt = Field(ge=0)


class TrainingPrices(_Strict):
    # auto-captioning (tagger or vision-language captioner), per image captioned, wherever it runs:
    # proposed captions and captions filled in at intake
    captioning_millibuzz_per_image: StrictInt = Field(0, ge=0)
    families: dict[str, TrainingFamilyPrice]


class PriceList(_Strict):
    generation: GenerationPrices
    training: TrainingPrices


@dataclass(frozen=True)
class HiresParams:
    """The hires-fix second pass: the upscaled output size and the steps it runs."""

    width: int
    height: int
    steps: int

    @classmethod
    def upscaled(cls, width: int, height: int, scale: float, steps: int) -> HiresParams:
        """The pass for upscaling `width`x`height` by `scale`, sizes rounded to multiples of 8."""
        return cls(width=int(round(width * scale / 8)) * 8, height=int(round(height * scale / 8)) * 8, steps=steps)


@dataclass(frozen=True)
class FaceFixParams:
    """The face fix of one image: up to `faces` inpaint passes at `width`x`height`, each running `steps`."""

    width: int
    height: int
    steps: int
    faces: int


@dataclass(frozen=True)
class QuoteItem:
    """One line of a quote: `amount` in whole buzz; `millibuzz` is the exact unrounded figure."""

    name: str
    amount: int
    detail: str
    millibuzz: int = 0


@dataclass(frozen=True)
class Quote:
    """A generation's price: `per_image` x `quantity` = `total`; items add up to `total`."""

    family: str
    quantity: int
    per_image: int
    total: int
    items: tuple[QuoteItem, ...]
    # who is paid what per delivered image, (account, amount, kind), summing to `per_image`; empty
    # means everything goes to the hold's destination (`genserve.billing.economy` fills it)
    legs_per_image: tuple[tuple[str, int, str], ...] = ()
    # the face fix is held for `face_fix_passes` passes per image (its most faces); the passes an image
    # did not need (fewer faces found) are given back at capture, `face_pass_millibuzz` each
    face_fix_passes: int = 0
    face_pass_millibuzz: int = 0
    min_per_image: int = 0

    def face_fix_refund(self, n_images: int, face_passes_run: int) -> int:
        """Whole buzz given back for the face passes `n_images` delivered images were held for but did
        not run: rounded down, and never taking an image under the price list's minimum."""
        n = min(_count("n_images", n_images), self.quantity)
        held = n * self.face_fix_passes
        unused = held - min(_count("face_passes_run", face_passes_run), held)
        return min(unused * self.face_pass_millibuzz // MILLI, (self.per_image - self.min_per_image) * n)

    def for_delivered(self, n_images: int, face_passes_run: int | None = None) -> int:
        """What to capture when `n_images` were delivered (never more than the total), less the face
        passes they did not run when `face_passes_run` (over the delivered images) is given."""
        n = min(_count("n_images", n_images), self.quantity)
        refund = 0 if face_passes_run is None else self.face_fix_refund(n, face_passes_run)
        return self.per_image * n - refund

    def legs_for_delivered(self, n_images: int, face_passes_run: int | None = None) -> list[tuple[str, int, str]] | None:
        """The capture's legs for `n_images` delivered (each party paid per delivered image only),
        summing to `for_delivered(n_images, face_passes_run)`; None for a plain capture to the hold's
        destination. A face-fix refund comes out of the platform's own leg (the face fix is its work)."""
        n = min(_count("n_images", n_images), self.quantity)
        if not self.legs_per_image or n == 0:
            return None
        refund = 0 if face_passes_run is None else self.face_fix_refund(n, face_passes_run)
        legs = []
        for account, amount, kind in self.legs_per_image:
            taken = min(refund, amount * n) if kind == "capture" else 0
            refund -= taken
            legs.append((account, amount * n - taken, kind))
        return legs

    def to_dict(self) -> dict[str, Any]:
        d = {
            "family": self.family,
            "quantity": self.quantity,
            "per_image": self.per_image,
            "total": self.total,
            "items": [item.__dict__ for item in self.items],
        }
        if self.legs_per_image:
            d["legs_per_image"] = [list(leg) for leg in self.legs_per_image]
        return d


@dataclass(frozen=True)
class TrainingQuote:
    """A training run's price: a per-step part, a per-saved-epoch part and the images auto-captioned
    at intake (a quote stored before captioning was priced reads as none captioned)."""

    family: str
    steps: int
    saved_epochs: int
    millibuzz_per_step: int
    buzz_per_saved_epoch: int
    total: int
    items: tuple[QuoteItem, ...]
    captioned_images: int = 0
    captioning_millibuzz_per_image: int = 0
    # the base model owner's licence fee, charged once and only when the run delivers its LoRA (a
    # canceled or failed run delivers nothing, so it pays no fee), and who it pays, (account, amount,
    # kind) summing to it: the owner and the platform's share (`genserve.billing.economy` fills both)
    owner_fee: int = 0
    owner_fee_legs: tuple[tuple[str, int, str], ...] = ()

    @property
    def captioning_cost(self) -> int:
        return _ceil_div(self.captioned_images * self.captioning_millibuzz_per_image, MILLI)

    def for_progress(self, steps_run: int, epochs_saved: int, *, delivered: bool = False) -> int:
        """What to capture after `steps_run` steps and `epochs_saved` saved epochs (capped at the plan),
        plus the owner fee when the run `delivered` its LoRA. The captions were made and shown at
        intake, so they are owed whatever the run did next."""
        steps = min(_count("steps_run", steps_run), self.steps)
        epochs = min(_count("epochs_saved", epochs_saved), self.saved_epochs)
        fee = self.owner_fee if delivered else 0
        return (_ceil_div(steps * self.millibuzz_per_step, MILLI) + epochs * self.buzz_per_saved_epoch
                + self.captioning_cost + fee)

    def legs_for_progress(self, steps_run: int, epochs_saved: int, *, delivered: bool,
                          destination: str) -> list[tuple[str, int, str]] | None:
        """The capture's legs: the run's own price to `destination` (the hold's) and, when the LoRA was
        delivered, the owner fee's legs; None for a plain capture (no fee owed)."""
        if not delivered or not self.owner_fee_legs:
            return None
        return [(destination, self.for_progress(steps_run, epochs_saved), "capture"), *self.owner_fee_legs]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "family": self.family,
            "steps": self.steps,
            "saved_epochs": self.saved_epochs,
            "total": self.total,
            "items": [item.__dict__ for item in self.items],
        }
        if self.owner_fee:
            d["owner_fee"] = self.owner_fee
            d["owner_fee_legs"] = [list(leg) for leg in self.owner_fee_legs]
        return d


def _count(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(f"{name} must be an integer >= {minimum}, got {value!r}", code="invalid_quote_input")
    return value


class Pricing:
    """Prices loaded once; quoting is pure integer arithmetic."""

    def __init__(self, prices: PriceList):
        self.prices = prices

    @classmethod
    def load(cls, path: str | Path) -> Pricing:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
            return cls(PriceList.model_validate(data))
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise ConfigError(f"invalid price list {path}: {exc}", code="pricing_invalid") from exc

    @classmethod
    def from_settings(cls, settings: Any) -> Pricing:
        return cls.load(settings.config_path(settings.billing.pricing_file))

    @property
    def generation_families(self) -> list[str]:
        return sorted(self.prices.generation.families)

    @property
    def training_families(self) -> list[str]:
        return sorted(self.prices.training.families)

    def quote_generation(
        self,
        family: str,
        width: int,
        height: int,
        steps: int,
        quantity: int,
        extra_resources: int = 0,
        hires: HiresParams | None = None,
        output_format: str = "png",
        workflow: str = "txt2img",
        face_fix: FaceFixParams | None = None,
    ) -> Quote:
        """Price `quantity` images; each costs at least `min_per_image`. For img2img and inpaint, `steps`
        are the steps the denoise runs (steps x strength, A1111's count), which may be 0."""
        gen = self.prices.generation
        fam = gen.families.get(family)
        if fam is None:
            raise InvalidRequest(
                f"no generation price for family {family!r}",
                code="unknown_family",
                details={"known": self.generation_families},
            )
        width, height = _count("width", width, minimum=1), _count("height", height, minimum=1)
        steps = _count("steps", steps, minimum=0 if workflow != "txt2img" else 1)
        quantity = _count("quantity", quantity, minimum=1)
        extra_resources = _count("extra_resources", extra_resources)
        base_units = fam.base_width * fam.base_height * fam.base_steps

        parts: list[tuple[str, int, str]] = []
        image_mb = _ceil_div(fam.base_millibuzz * width * height * steps, base_units)
        label = "" if workflow == "txt2img" else f" {workflow}"
        parts.append(("image", image_mb, f"{family}{label} {width}x{height}, {steps} steps"))
        if hires is not None:
            h_w, h_h = _count("hires.width", hires.width, minimum=1), _count("hires.height", hires.height, minimum=1)
            h_steps = _count("hires.steps", hires.steps, minimum=1)
            hires_mb = _ceil_div(fam.base_millibuzz * h_w * h_h * h_steps * gen.hires_permille, base_units * MILLI)
            parts.append(("hires_fix", hires_mb, f"second pass {h_w}x{h_h}, {h_steps} steps"))
        face_passes, pass_mb = 0, 0
        if face_fix is not None:
            face_passes = _count("face_fix.faces", face_fix.faces, minimum=1)
            f_units = face_fix.width * face_fix.height * _count("face_fix.steps", face_fix.steps) * face_passes
            face_mb = _ceil_div(fam.base_millibuzz * f_units * gen.face_fix_permille, base_units * MILLI)
            pass_mb = face_mb // face_passes  # rounded down: a refund never exceeds what a pass was held for
            parts.append(("face_fix", face_mb, f"up to {face_fix.faces} face(s) at {face_fix.width}x"
                                               f"{face_fix.height}, {face_fix.steps} steps each"))
        if extra_resources:
            parts.append(
                ("extra_resources", extra_resources * gen.extra_resource_millibuzz, f"{extra_resources} extra resources")
            )

        workflow_mb = gen.workflow_millibuzz.get(workflow, 0)
        if workflow_mb:
            parts.append(("workflow", workflow_mb, f"{workflow} input handling"))
        format_mb = gen.output_format_millibuzz.get(output_format, 0)
        if format_mb:
            parts.append(("output_format", format_mb, f"{output_format} output"))
        per_image = max(gen.min_per_image, _ceil_div(sum(mb for _, mb, _ in parts), MILLI))
        total = per_image * quantity
        items = [
            QuoteItem(name, mb * quantity // MILLI, f"{detail}: {mb} millibuzz/image x {quantity}", mb * quantity)
            for name, mb, detail in parts
        ]
        rest = total - sum(item.amount for item in items)
        if rest:
            items.append(QuoteItem("rounding", rest, f"rounded up to whole buzz, at least {gen.min_per_image}/image"))
        return Quote(family=family, quantity=quantity, per_image=per_image, total=total, items=tuple(items),
                     face_fix_passes=face_passes, face_pass_millibuzz=pass_mb, min_per_image=gen.min_per_image)

    def captioning_cost(self, images: int) -> int:
        """Whole buzz for auto-captioning `images` images (rounded up once, not per image)."""
        return _ceil_div(_count("images", images) * self.prices.training.captioning_millibuzz_per_image, MILLI)

    def quote_training(self, family: str, steps: int, saved_epochs: int, captioned_images: int = 0) -> TrainingQuote:
        """Price a LoRA training run by its steps, the epochs it saves and the images captioned at intake."""
        fam = self.prices.training.families.get(family)
        if fam is None:
            raise InvalidRequest(
                f"no training price for family {family!r}",
                code="unknown_family",
                details={"known": self.training_families},
            )
        steps = _count("steps", steps, minimum=1)
        saved_epochs = _count("saved_epochs", saved_epochs)
        caption_mb = self.prices.training.captioning_millibuzz_per_image
        caption_cost = self.captioning_cost(captioned_images)
        steps_mb = steps * fam.millibuzz_per_step
        step_cost = _ceil_div(steps_mb, MILLI)
        epoch_cost = saved_epochs * fam.buzz_per_saved_epoch
        items = (
            QuoteItem("steps", step_cost, f"{steps} steps x {fam.millibuzz_per_step} millibuzz, rounded up", steps_mb),
            QuoteItem(
                "saved_epochs", epoch_cost, f"{saved_epochs} saved epochs x {fam.buzz_per_saved_epoch}",
                epoch_cost * MILLI,
            ),
        )
        if captioned_images:
            items += (QuoteItem("captioning", caption_cost,
                                f"{captioned_images} images auto-captioned x {caption_mb} millibuzz, rounded up",
                                captioned_images * caption_mb),)
        return TrainingQuote(
            family=family, steps=steps, saved_epochs=saved_epochs, millibuzz_per_step=fam.millibuzz_per_step,
            buzz_per_saved_epoch=fam.buzz_per_saved_epoch, total=step_cost + epoch_cost + caption_cost, items=items,
            captioned_images=captioned_images, captioning_millibuzz_per_image=caption_mb,
        )

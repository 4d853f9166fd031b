"""`configs/models.yaml`: model families (pipeline, sizes, mandatory safety embeddings) and local checkpoints.

Paths in the file are relative to the models dir (`settings.models_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genserve.core.errors import ConfigError

CATALOG_FILE = "models.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingEntry(_Strict):
    token: str
    file: str


class DraftEntry(_Strict):
    """Draft mode of a family (Civitai's `txt2img:draft`): an LCM-style LoRA and the few steps, low CFG
    and sampler it is made for."""

    lora: str  # the registered LoRA resource's id
    steps: int = Field(8, ge=1, le=16)
    cfg_scale: float = Field(1.0, ge=0.0, le=3.0)
    sampler: str = "LCM"


class FamilyEntry(_Strict):
    pipeline: str
    default_size: tuple[int, int]
    allowed_sizes: list[tuple[int, int]] = Field(default_factory=list)
    safety_embeddings: dict[str, EmbeddingEntry]
    draft: DraftEntry | None = None

    def safety_embeddings_config(self) -> dict[str, dict[str, Any]]:
        """The mapping `safety.embeddings.SafetyEmbeddings.from_config` reads."""
        return {kind: entry.model_dump() for kind, entry in self.safety_embeddings.items()}


class CheckpointEntry(_Strict):
    id: str
    family: str
    format: str
    path: str
    # the diffusers config folder a single-file checkpoint needs to be rebuilt offline
    config: str | None = None


class ModelCatalog(_Strict):
    families: dict[str, FamilyEntry]
    checkpoints: list[CheckpointEntry] = Field(default_factory=list)

    def family(self, name: str) -> FamilyEntry:
        try:
            return self.families[name]
        except KeyError:
            raise ConfigError(f"model family {name!r} is not in {CATALOG_FILE}", code="unknown_family") from None

    def checkpoint(self, checkpoint_id: str) -> CheckpointEntry | None:
        return next((c for c in self.checkpoints if c.id == checkpoint_id), None)


def load_model_catalog(path: str | Path) -> ModelCatalog:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return ModelCatalog.model_validate(raw)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"cannot read the model catalog {path}: {exc}", code="model_catalog_invalid") from exc

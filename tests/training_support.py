"""Shared pieces of the training tests: toy datasets, settings, a funded user and registered base models."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genserve.billing.ledger import user_account
from genserve.core.config import Settings, load_settings

COLOURS = [(220, 40, 40), (40, 40, 220), (40, 200, 60), (230, 210, 30)]


def toy_image(index: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A learnable target: a flat colour with a contrasting square whose place depends on `index`."""
    w, h = size
    colour = np.array(COLOURS[index % len(COLOURS)], dtype=np.uint8)
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = colour
    q = min(w, h) // 4
    top, left = (index % 2) * q * 2, (index // 2 % 2) * q * 2
    arr[top : top + q * 2, left : left + q * 2] = 255 - colour
    return Image.fromarray(arr)


def toy_zip(path: Path, n: int = 4, captions: dict[int, str] | None = None, size: tuple[int, int] = (64, 64)) -> Path:
    """A zip of `n` toy PNGs; `captions` maps an index to its `.txt` caption (default: a plain one)."""
    captions = captions if captions is not None else {i: f"toy square {i}, flat colour" for i in range(n)}
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            buf = io.BytesIO()
            toy_image(i, size).save(buf, format="PNG")
            zf.writestr(f"img{i}.png", buf.getvalue())
            if i in captions:
                zf.writestr(f"img{i}.txt", captions[i])
    return path


def training_settings(tmp_path: Path, **training: Any) -> Settings:
    """Settings on a fresh data dir with progress written on every step (tests watch it)."""
    return load_settings(env={"GENSERVE_DATA_DIR": str(tmp_path / "data")},
                         overrides={"training": {"progress_interval_s": 0, **training}})


def register_base_models(deps, tiny_models) -> None:  # noqa: ANN001 - TrainingDeps, {family: TinyModel}
    """Publish the tiny checkpoints under the ids `configs/training.yaml` trains on, and put the families'
    safety embeddings in the models dir, where `genserve serve` keeps them."""
    models_dir = deps.settings.models_dir
    models_dir.mkdir(parents=True, exist_ok=True)
    if not (models_dir / "embeddings").exists():
        (models_dir / "embeddings").symlink_to(next(iter(tiny_models.values())).embeddings["general"].parent)
    for family, spec in deps.limits.base_models.items():
        deps.registry.publish(tiny_models[family].diffusers_dir, id=spec.checkpoint, kind="checkpoint", family=family)


def fund(deps, user: str, amount: int) -> None:  # noqa: ANN001
    deps.ledger.grant(user_account(user), amount, key=f"test-grant:{user}:{amount}")


def available(deps, user: str) -> int:  # noqa: ANN001
    return deps.ledger.balance(user_account(user)).available


def build_router_with_ingress_auth(service):  # noqa: ANN001, ANN201 - a TrainingService -> APIRouter
    """The training router guarded by the ingress's own token checks (`genserve.ingress.Auth` on the
    service's settings): `Authorization: Bearer <service token>` + `X-User-Id`, and the admin token."""
    from genserve.ingress import Auth, auth_dependencies
    from training.api import build_router

    return build_router(service, *auth_dependencies(Auth(service.deps.settings)))


def register_base_models_from(deps, models_dir: Path) -> None:  # noqa: ANN001 - TrainingDeps
    """`register_base_models` for a process without the `tiny_models` fixture: the tiny models under
    `models_dir` (as `build_tiny_models` lays them out)."""
    from genserve.tinymodels import build_tiny_models

    register_base_models(deps, build_tiny_models(models_dir, seed=0))


def job_pid(training_id: str) -> int | None:
    """The pid of `python -m training.run TRAINING_ID` on this host."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"training.run" in args and training_id.encode() in args:
            return int(entry.name)
    return None

"""Training checkpoints in safetensors + JSON only: nothing a resume reads can execute code.

A checkpoint is a folder:
- `adapter.safetensors`: the LoRA weights (PEFT names, prefixed `unet.` / `text_encoder.` / `text_encoder_2.`)
- `optimizer.safetensors`: every tensor of the optimizer state, as `state.<param index>.<name>`
- `rng.safetensors`: the trainer's generator and torch's CPU/CUDA RNG states (uint8 tensors)
- `state.json`: step and epoch (counted by the job), the optimizer's scalars and param groups, the
  LR scheduler and the loss scaler; written last, so a folder without it is incomplete.

Hand-written rather than accelerate's `save_state`/`load_state`: those pickle the optimizer, scheduler
and RNG states and load them with `torch.load`, which the house rules forbid for anything a job reads
back (a resume must never execute code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FILES = ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    step: int
    epoch: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any]


def _json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (inf/nan) are written as strings and read back by `_json_value`."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _split_entry(entry: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move the tensors of one (possibly nested) state entry into `tensors`; return what is left.

    Nested dicts (bitsandbytes keeps its 8-bit quantisation state in one) are kept by path: a tensor
    at entry[a][b] is stored as `<prefix>a/b`."""
    rest: dict[str, Any] = {}
    for name, value in entry.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}{name}"] = value.detach().to("cpu").contiguous()
        elif isinstance(value, dict):
            rest[name] = {"__nested__": _split_entry(value, f"{prefix}{name}/", tensors)}
        else:
            rest[name] = value
    return rest


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        rest = _split_entry(entry, f"state.{index}.", tensors)
        if rest:
            scalars[str(index)] = rest
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _join_entry(target: dict[str, Any], rest: dict[str, Any]) -> None:
    for name, value in rest.items():
        if isinstance(value, dict) and set(value) == {"__nested__"}:
            _join_entry(target.setdefault(name, {}), value["__nested__"])
        else:
            target[name] = value


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        *path, leaf = name.split("/")
        target = state.setdefault(int(index), {})
        for part in path:
            target = target.setdefault(part, {})
        target[leaf] = value
    for index, entries in meta["scalars"].items():
        _join_entry(state.setdefault(int(index), {}), entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: str | Path, state: CheckpointState) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.adapter.items()}, folder / FILES[0])
    opt_tensors, opt_meta = _split_optimizer(state.optimizer)
    save_file(opt_tensors, folder / FILES[1])
    save_file({k: v.contiguous() for k, v in state.rng.items()}, folder / FILES[2])
    meta = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "epoch": state.epoch,
        "optimizer": opt_meta,
        "scheduler": state.scheduler,
        "scaler": state.scaler,
        "extra": state.extra,
    }
    tmp = folder / (FILES[3] + ".tmp")
    tmp.write_text(json.dumps(_json_safe(meta)))
    tmp.replace(folder / FILES[3])
    return folder


def load_checkpoint(folder: str | Path) -> CheckpointState:
    folder = Path(folder)
    meta = _json_value(json.loads((folder / FILES[3]).read_text()))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {meta.get('format')!r} in {folder}")
    return CheckpointState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        adapter=load_file(folder / FILES[0]),
        optimizer=_join_optimizer(load_file(folder / FILES[1]), meta["optimizer"]),
        scheduler=meta["scheduler"],
        scaler=meta["scaler"],
        rng=load_file(folder / FILES[2]),
        extra=meta["extra"],
    )

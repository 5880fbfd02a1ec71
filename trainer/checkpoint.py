"""Atomic writes, step checkpoints and resume.

Layout of a run folder (`<save.output_dir>/<save.name>`):

    <name>-step000250.safetensors   the LoRA at step 250, written by a callable the caller passes in
    state-step000250/               the training state at step 250 (only when asked for):
        params.safetensors          the trainable tensors in their own dtype (fp32), for a bit-exact resume
        state.pt                    optimizer, scheduler, EMA, sampler and RNG states (torch.save; loaded
                                    with weights_only=True, so only tensors and plain Python values)
        config.json                 the run's config dict
        meta.json                   format, version and step; written last
    latest                          JSON {"step", "lora", "state"} naming the last complete save

Every file is written to a hidden temp name in the same folder (`.<target>.tmp-<pid>-<token>`), fsynced and
renamed into place; a state folder is built under a temp name and renamed as a whole; `latest` is updated
last. A process killed mid-save therefore leaves the previous checkpoint untouched and `latest` pointing at
it; its temp files are ignored by every reader and removed by the next save once their process is gone.
The resume state stores the trainable weights themselves because the LoRA file is a deliverable (save
dtype, dialect, folded scale) that need not round-trip bit-exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ZitError
from .files import atomic_write, atomic_write_dir, clean_stale_temps, remove_path

STATE_FORMAT = "zit-trainer-state"
STATE_VERSION = 1
LATEST = "latest"
_STATE_RE = re.compile(r"^state-step(?P<step>\d{6,})$")


class CheckpointError(ZitError):
    """A training state that cannot be read or does not fit the objects it should restore."""


class Stateful(Protocol):
    """Anything with state_dict() / load_state_dict(d): schedulers, the EMA, the data sampler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Checkpoint:
    """One saved step: its LoRA file and its complete training-state folder (either may be absent)."""

    step: int
    lora: Path | None
    state: Path | None


def lora_path(run_dir: str | os.PathLike, name: str, step: int) -> Path:
    """run_dir/<name>-stepNNNNNN.safetensors."""
    return Path(run_dir) / f"{name}-step{step:06d}.safetensors"


def state_path(run_dir: str | os.PathLike, step: int) -> Path:
    """run_dir/state-stepNNNNNN."""
    return Path(run_dir) / f"state-step{step:06d}"


def _is_complete_state(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "state.pt").is_file()


def list_checkpoints(run_dir: str | os.PathLike, name: str | None = None) -> list[Checkpoint]:
    """Every step with a LoRA file or a complete state in run_dir, oldest first (name: run_dir's name)."""
    run_dir = Path(run_dir)
    name = run_dir.name if name is None else name
    lora_re = re.compile(rf"^{re.escape(name)}-step(?P<step>\d{{6,}})\.safetensors$")
    loras: dict[int, Path] = {}
    states: dict[int, Path] = {}
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if (m := lora_re.match(entry.name)) and entry.is_file():
                loras[int(m["step"])] = entry
            elif (m := _STATE_RE.match(entry.name)) and _is_complete_state(entry):
                states[int(m["step"])] = entry
    return [Checkpoint(s, loras.get(s), states.get(s)) for s in sorted(loras.keys() | states.keys())]


def _read_latest(run_dir: Path) -> Checkpoint | None:
    """The checkpoint the `latest` marker names, if the marker is readable and its files are all there."""
    try:
        marker = json.loads((run_dir / LATEST).read_text(encoding="utf-8"))
        lora = run_dir / marker["lora"] if marker["lora"] else None
        state = run_dir / marker["state"] if marker["state"] else None
        step = int(marker["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (lora and not lora.is_file()) or (state and not _is_complete_state(state)):
        return None
    return Checkpoint(step, lora, state)


def find_latest_checkpoint(run_dir: str | os.PathLike, name: str | None = None) -> Checkpoint | None:
    """The last complete save: the one `latest` names, else the newest with a state, else the newest LoRA."""
    run_dir = Path(run_dir)
    marked = _read_latest(run_dir)
    if marked is not None:
        return marked
    found = list_checkpoints(run_dir, name)
    with_state = [c for c in found if c.state is not None]
    return (with_state or found or [None])[-1]


def _write_latest(run_dir: Path, ckpt: Checkpoint) -> None:
    marker = {
        "step": ckpt.step,
        "lora": ckpt.lora.name if ckpt.lora else None,
        "state": ckpt.state.name if ckpt.state else None,
    }
    atomic_write(run_dir / LATEST, lambda p: p.write_text(json.dumps(marker) + "\n", encoding="utf-8"))


def prune_checkpoints(run_dir: str | os.PathLike, name: str, keep_last: int, current_step: int) -> list[Path]:
    """Delete all but the keep_last newest steps up to current_step (0 keeps all); later steps are kept."""
    if keep_last <= 0:
        return []
    older = [c for c in list_checkpoints(run_dir, name) if c.step < current_step]
    removed = []
    for ckpt in older[: max(0, len(older) - (keep_last - 1))]:
        for path in (ckpt.lora, ckpt.state):
            if path is not None:
                remove_path(path)
                removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------- training state


@dataclass
class TrainingObjects:
    """The live objects a training state is saved from and restored into."""

    params: Mapping[str, torch.Tensor]  # the trainable tensors by name (restored in place)
    optimizer: torch.optim.Optimizer
    scheduler: Stateful | None = None
    ema: Stateful | None = None
    sampler: Stateful | None = None  # the data sampler (its state must be plain Python values / tensors)
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)


RUN_RECORD = "run"
"""Key of the saved config.json's record of how the run was split (processes, global batch)."""


def read_run_record(state: str | os.PathLike) -> dict[str, Any] | None:
    """The run record saved beside a training state's config (None for older states or without one)."""
    try:
        config = json.loads((Path(state) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = config.get(RUN_RECORD) if isinstance(config, dict) else None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class ResumeInfo:
    """What load_training_state read besides the objects it restored."""

    step: int
    config: dict[str, Any] | None
    path: Path


def _rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, Any]:
    """Every random stream: python, numpy, torch CPU, CUDA (if initialised) and the given generators."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    cuda = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    return {
        "python": random.getstate(),
        "numpy": (np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def _set_rng_state(state: dict[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    _set_cuda_rng(state["cuda"])
    for name, g in generators.items():
        if name not in state["generators"]:
            raise CheckpointError(f"training state has no RNG state for generator {name!r}")
        g.set_state(state["generators"][name])


def _set_cuda_rng(states: list[torch.Tensor] | None) -> None:
    if states is None:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(states):
        warnings.warn("CUDA RNG state not restored: the number of CUDA devices differs", stacklevel=3)
        return
    torch.cuda.set_rng_state_all(states)


def _state_payload(objects: TrainingObjects, step: int) -> dict[str, Any]:
    def sd(obj: Stateful | None) -> dict[str, Any] | None:
        return None if obj is None else obj.state_dict()

    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "optimizer": objects.optimizer.state_dict(),
        "scheduler": sd(objects.scheduler),
        "ema": sd(objects.ema),
        "sampler": sd(objects.sampler),
        "rng": _rng_state(objects.generators),
    }


def save_training_state(
    path: str | os.PathLike, objects: TrainingObjects, step: int, config: dict[str, Any] | None = None
) -> Path:
    """Write the resumable state at step into the folder path, atomically (see the module doc)."""
    payload = _state_payload(objects, step)
    tensors = {k: v.detach().contiguous().cpu() for k, v in objects.params.items()}
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "params.safetensors")
        torch.save(payload, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n", encoding="utf-8")

    return atomic_write_dir(path, write)


def _read_state(path: Path) -> dict[str, Any]:
    if not _is_complete_state(path):
        raise CheckpointError(f"{path}: not a complete training state (meta.json or state.pt missing)")
    try:
        payload = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path / 'state.pt'}: cannot read the training state ({exc})") from None
    if payload.get("format") != STATE_FORMAT or payload.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} v{STATE_VERSION} training state")
    return payload


@torch.no_grad()
def _restore_params(path: Path, params: Mapping[str, torch.Tensor]) -> None:
    saved = load_file(path / "params.safetensors")
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: trainable tensors differ: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, p in params.items():
        if p.shape != saved[name].shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(saved[name].shape)}, expected {tuple(p.shape)}"
            )
        p.copy_(saved[name])


def _restore(label: str, obj: Stateful | None, state: dict[str, Any] | None, path: Path) -> None:
    if obj is None:
        return
    if state is None:
        warnings.warn(f"{path}: no {label} state saved; the {label} starts fresh", stacklevel=3)
        return
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the saved {label} state does not fit ({exc})") from None


def load_training_state(
    path: str | os.PathLike, objects: TrainingObjects, restore_rng: bool = True
) -> ResumeInfo:
    """Restore params, optimizer, scheduler, EMA, sampler and RNG streams from a state folder.

    Build the optimizer and scheduler first (a LambdaLR's constructor rewrites the lr), then load.
    """
    path = Path(path)
    payload = _read_state(path)
    _restore_params(path, objects.params)
    _restore("optimizer", objects.optimizer, payload["optimizer"], path)
    _restore("scheduler", objects.scheduler, payload["scheduler"], path)
    _restore("EMA", objects.ema, payload["ema"], path)
    _restore("sampler", objects.sampler, payload["sampler"], path)
    if restore_rng:
        _set_rng_state(payload["rng"], objects.generators)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return ResumeInfo(step=int(payload["step"]), config=config, path=path)


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    run_dir: str | os.PathLike,
    name: str,
    step: int,
    write_lora: Callable[[Path], None],
    objects: TrainingObjects | None = None,
    config: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Checkpoint:
    """Save the LoRA via write_lora(temp_path), the training state if objects are given, `latest`; prune."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(run_dir)
    lora = atomic_write(lora_path(run_dir, name, step), write_lora)
    state = save_training_state(state_path(run_dir, step), objects, step, config) if objects else None
    ckpt = Checkpoint(step, lora, state)
    _write_latest(run_dir, ckpt)
    prune_checkpoints(run_dir, name, keep_last, step)
    return ckpt

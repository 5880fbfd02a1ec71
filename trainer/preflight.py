"""The checks a training run's files need before anything loads, with no torch import: the folders it writes
(run folder, cache) are folders it can write, an earlier run in the run folder is continued or replaced
only when asked, and every file the config names exists and can be read.

The command line runs `check_run` right after the config; each refusal is a `FileRefused` naming the config
key, the value and the reason, e.g. `model.vae = 'ae.safetensors': no such file or folder`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config_fields import TrainConfig
from .files import FileRefused, check_folder, os_reason


def _value(dotted: str, value: str) -> str:
    return f"{dotted} = {value!r}"


def check_output_folders(cfg: TrainConfig) -> None:
    """save.output_dir, the run folder and the cache folder are (or can become) folders this process can
    write."""
    check_folder(cfg.save.output_dir, _value("save.output_dir", cfg.save.output_dir))
    check_folder(cfg.run_dir, f"the run folder {cfg.run_dir} (save.output_dir / save.name)")
    label = _value("data.cache_dir", cfg.data.cache_dir) if cfg.data.cache_dir else \
        f"the cache folder {cfg.cache_path} (data.cache_dir is empty)"
    check_folder(cfg.cache_path, label)


def earlier_run(run_dir: Path, name: str) -> list[str]:
    """The files of an earlier run named `name` in run_dir: `latest`, step LoRAs, the final LoRA, states."""
    if not run_dir.is_dir():
        return []
    found = [p.name for p in run_dir.iterdir()
             if p.name in ("latest", f"{name}.safetensors") or p.name.startswith("state-step")
             or (p.name.startswith(f"{name}-step") and p.name.endswith(".safetensors"))]
    return sorted(found)


def check_earlier_run(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """A fresh run does not write over an earlier one's checkpoints unless `overwrite`."""
    if resume and overwrite:
        raise FileRefused("--resume and --overwrite: give one (continue the run, or train it again over it)")
    found = [] if resume or overwrite else earlier_run(cfg.run_dir, cfg.save.name)
    if found:
        raise FileRefused(f"the run folder {cfg.run_dir} already holds a run named {cfg.save.name!r} "
                          f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): give --resume to "
                          "continue it, --overwrite to train again over it, or another save.name")


def _input_error(path: Path, folder: bool | None) -> str | None:
    """Why a named input cannot be used: missing, unreadable, or a file where a folder is needed."""
    if not path.exists():
        try:
            os.stat(path)
        except OSError as exc:
            return os_reason(exc)
        return "no such file or folder"
    if path.is_dir():
        if folder is False:
            return "is a folder, not a file"
        return None if os.access(path, os.R_OK | os.X_OK) else "permission denied"
    if folder:
        return "is a file, not a folder"
    return None if os.access(path, os.R_OK) else "permission denied"


def named_inputs(cfg: TrainConfig) -> list[tuple[str, str, bool | None]]:
    """(dotted key, path, folder?) of every file or folder the config makes the run read (None: either)."""
    m, t = cfg.model, cfg.turbo
    items: list[tuple[str, str, bool | None]] = []
    if m.transformer != "tiny":
        items += [("model.transformer", m.transformer, None), ("model.text_encoder", m.text_encoder, None),
                  ("model.vae", m.vae, None)]
    items += [("data.dataset", cfg.data.dataset, True), ("turbo.teacher_prompts", t.teacher_prompts, False),
              ("preview.turbo_model", cfg.preview.turbo_model, None)]
    if t.uses_adapter:
        items.append(("turbo.adapter", t.adapter, None))
    return [(key, value, folder) for key, value, folder in items if value]


def check_inputs(cfg: TrainConfig) -> None:
    """Every file or folder the config names exists and is readable (the first that is not is refused)."""
    for key, value, folder in named_inputs(cfg):
        why = _input_error(Path(value), folder)
        if why:
            raise FileRefused(f"{_value(key, value)}: {why}")


def check_run(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> None:
    """All of the above, in order: the inputs, the folders written, an earlier run."""
    check_inputs(cfg)
    check_output_folders(cfg)
    check_earlier_run(cfg, resume, overwrite)

"""What the training-loop tests (test_loop*.py) share: the tiny fp32 run config, the dataset and cache
fixtures, tensor comparisons and a stop-requesting JobContext stand-in.

Every run is a real Trainer on the tiny seeded Z-Image stack at 64 px (4 image tokens per side after the
patch), so a step takes milliseconds; bitwise comparisons hold because CPU fp32 with one thread is
deterministic and the saved LoRAs are fp32 with alpha = rank (the folded scale is exactly 1).

A test module imports the fixtures under their own names (`from _loop_helpers import images as images`):
each module then gets its own module-scoped instances, as when they were defined there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig, config_from_dict
from trainer.demo import make_dataset

SIZE = 64


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three 64 px images with caption files."""
    return make_dataset(tmp_path_factory.mktemp("data") / "images", n=3, size=SIZE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A latent/text cache shared by the runs of a module (content-addressed, so order does not matter)."""
    return tmp_path_factory.mktemp("cache")


def merge_sections(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with each section of `extra` updated into it (neither is changed)."""
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def make_config(
    out: Path, dataset: Path, cache: Path | None = None, **sections: dict[str, Any]
) -> TrainConfig:
    """A tiny fp32 run in `out`: rank 4 = alpha, fp32 saves, no previews or step saves unless asked."""
    base = {
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(dataset), "resolutions": [SIZE], "min_side": 32, "caption_dropout": 0.0,
                 "cache_dir": str(cache or out / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 6, "seed": 0},
        "save": {"output_dir": str(out), "name": "run", "every": 0},
        "preview": {"every": 0},
    }
    return config_from_dict(merge_sections(base, sections), source="test")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class Events:
    """A job context that records events (the CLI and the ComfyUI job runner get the same ones)."""

    stop_requested = False

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def emit(self, kind: str, **data) -> None:
        self.seen.append((kind, data))

    def of(self, kind: str) -> list[dict]:
        return [d for k, d in self.seen if k == kind]


class StopAfter:
    """A JobContext stand-in that asks to stop once `step` steps are done and records the events."""

    def __init__(self, step: int):
        self.step, self.done = step, 0
        self.events: list[tuple[str, dict[str, Any]]] = []

    @property
    def stop_requested(self) -> bool:
        return self.done >= self.step

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))
        if kind == "progress":
            self.done = data["step"]

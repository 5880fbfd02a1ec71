"""Distill mode's share of a training run: the teacher prompts, the cached trajectories and the health meter.

Teacher prompts come from the dataset's captions (each at its bucket size) and from `turbo.teacher_prompts`,
a text file with one prompt per line (blank lines and lines starting with "#" are skipped), sampled square
at the largest of `data.resolutions`; with a prompt file and no `data.dataset` no images are needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .data import CachedDataset, cached_text_embeddings
from .distill import DistillError, TeacherSettings
from .distill_cache import TrajectorySet, load_trajectories, lora_fingerprint, trajectory_set
from .health import TeacherDistance
from .lora.canonical import Lora

HEALTH_TRAJECTORIES = 4
"""How many cached trajectories (the first ones) the distill health meter samples each time."""

Prompt = tuple[torch.Tensor, int, int]  # a prompt embedding (L, hidden), width, height


def read_prompt_list(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file, one per line; blank and "#" lines skipped. DistillError if none."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistillError(f"turbo.teacher_prompts = {str(path)!r}: no such file") from None
    except PermissionError:
        raise DistillError(f"turbo.teacher_prompts = {str(path)!r}: permission denied") from None
    except IsADirectoryError:
        raise DistillError(f"turbo.teacher_prompts = {str(path)!r}: is a folder, not a text file") from None
    except UnicodeDecodeError as e:
        raise DistillError(f"turbo.teacher_prompts = {str(path)!r}: not UTF-8 (byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise DistillError(f"turbo.teacher_prompts = {str(path)!r}: no prompts (one per line)")
    return prompts


def teacher_prompts(data: CachedDataset | None, prompt_list: Sequence[str], size: int, cache_dir: str,
                    encode_text: Callable[[list[str]], Sequence[object]], te_id: str) -> list[Prompt]:
    """Every distinct (caption, bucket) of the cached dataset, then the prompt list at size x size."""
    found: list[Prompt] = []
    if data is not None:
        captions = sorted({(e.text_file, e.sample.bucket) for e in data.entries})
        found += [(load_file(f)["text"], *bucket) for f, bucket in captions]
    if prompt_list:
        found += [(e, size, size) for e in cached_text_embeddings(list(prompt_list), cache_dir, encode_text,
                                                                   te_id)]
    return found


def teacher_identity(base_id: str, sft: Lora, strength: float, dtype: str) -> str:
    """What the teacher is (base weights, SFT LoRA, its strength, compute dtype): part of the cache key."""
    return f"{base_id}|sft={lora_fingerprint(sft)}@{strength}|{dtype}"


def build_trajectories(model: nn.Module, prompts: Sequence[Prompt], seeds: Sequence[int],
                       negative: torch.Tensor, cache_dir: str, model_id: str, teacher: TeacherSettings,
                       disable: Sequence[str], progress: Callable[[int, int], None]) -> TrajectorySet:
    """The cached teacher trajectory of every prompt x seed, sampled (model in eval) where missing."""
    if not prompts:
        raise DistillError("distill: no teacher prompts (the dataset has no captions and "
                           "turbo.teacher_prompts is empty)")
    was_training = model.training
    model.eval()
    try:
        return trajectory_set(model, prompts, seeds, negative, cache_dir, model_id, teacher,
                              disable=list(disable), progress=progress)
    finally:
        model.train(was_training)


def distill_meter(model: nn.Module, trajectories: TrajectorySet, device: torch.device,
                  reference_disable: Sequence[str]) -> TeacherDistance:
    """The distill health meter on the first trajectories of the run's most common size."""
    shapes = [job.shape for job in trajectories.jobs]
    common = max(set(shapes), key=shapes.count)
    picks = [i for i, s in enumerate(shapes) if s == common][:HEALTH_TRAJECTORIES]
    latents = load_trajectories([trajectories.paths[i] for i in picks]).to(device)
    embeds = [trajectories.jobs[i].embed.to(device) for i in picks]
    return TeacherDistance(model, latents, embeds, reference_disable=reference_disable)

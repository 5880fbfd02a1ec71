"""Teacher trajectories for distill mode: sampled once, cached content-addressed next to the latent cache.

An entry is `<cache>/trajectories/<key>.safetensors` holding "latents" (9, C, h, w) float32: the teacher's
latents at the 8 student sigmas and at s = 0. The key hashes the prompt and negative embeddings' bytes, the
seed, the size, the teacher settings and a model identity the caller passes (base weights + SFT LoRA +
its strength), so any change is a miss. Files are written atomically one by one, so an interrupted build
resumes where it stopped; an entry that does not read back as finite latents of the right shape is logged
and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .distill import DISTILL_ADAPTER, STUDENT_GRID, DistillError, TeacherSettings
from .files import atomic_write
from .lora.canonical import Lora
from .model import adapters_disabled, predict_velocity
from .sampling import LATENT_CHANNELS, VAE_FACTOR, initial_noise

log = logging.getLogger(__name__)

TRAJECTORY_VERSION = "zit-trajectory-1"
TENSOR = "latents"

DoneTotal = Callable[[int, int], None]


@dataclass(frozen=True)
class TrajectoryJob:
    """One teacher trajectory to make: a prompt embedding (L, hidden), a noise seed and the image size."""

    embed: torch.Tensor
    seed: int
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the cached latents: (9, C, height / 8, width / 8)."""
        return (len(STUDENT_GRID), LATENT_CHANNELS, self.height // VAE_FACTOR, self.width // VAE_FACTOR)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def lora_fingerprint(lora: Lora) -> str:
    """sha256 of a LoRA's modules (names, factors as fp32), for model identities."""
    h = hashlib.sha256()
    for key in sorted(lora.modules):
        m = lora.modules[key]
        h.update(f"{key[0]}.{key[1]}|".encode())
        h.update(tensor_digest(m.a.float()).encode())
        h.update(tensor_digest(m.b.float()).encode())
    return h.hexdigest()


def trajectory_key(
    job: TrajectoryJob, negative: torch.Tensor, settings: TeacherSettings, model_id: str
) -> str:
    """Cache key of a trajectory: embeddings' bytes, seed, size, teacher settings, model identity."""
    parts = [TRAJECTORY_VERSION, model_id, settings.describe(), f"{job.width}x{job.height}", str(job.seed),
             tensor_digest(job.embed), tensor_digest(negative)]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def trajectory_path(cache_dir: str | os.PathLike, key: str) -> Path:
    """Where the trajectory with this key is stored."""
    return Path(cache_dir) / "trajectories" / f"{key}.safetensors"


def trajectory_problem(path: Path, shape: Sequence[int]) -> str | None:
    """Why a cache entry cannot be used ("missing", unreadable, wrong shape or dtype, non-finite), or None."""
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as handle:
            if TENSOR not in handle.keys():
                return f"no tensor {TENSOR!r}"
            latents = handle.get_tensor(TENSOR)
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
        return f"unreadable ({type(e).__name__}: {e})"
    if tuple(latents.shape) != tuple(shape):
        return f"shape {tuple(latents.shape)}, expected {tuple(shape)}"
    if latents.dtype != torch.float32:
        return f"dtype {latents.dtype}, expected torch.float32"
    if not torch.isfinite(latents).all():
        return "non-finite values"
    return None


@torch.no_grad()
def teacher_trajectories(
    model: nn.Module,
    embeds: Sequence[torch.Tensor],
    negative: torch.Tensor,
    seeds: Sequence[int],
    width: int,
    height: int,
    settings: TeacherSettings,
) -> torch.Tensor:
    """Sample the model as it is (the caller switches adapters) and keep the student-grid latents.

    Same Euler/CFG steps and noise as trainer.sampling.sample_latents; returns (B, 9, C, h, w) fp32 on
    the CPU: the latents at the 8 student sigmas and at s = 0.
    """
    device = next(model.parameters()).device
    x = torch.stack([initial_noise(s, width, height) for s in seeds]).to(device)
    sigmas = settings.sigmas().tolist()
    keep = settings.student_indices()
    embeds = [e.to(device) for e in embeds]
    negatives = [negative.to(device)] * len(seeds)
    kept = [x.float().cpu()]
    for k, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True), start=1):
        sig = torch.full((len(seeds),), s, device=device)
        v = predict_velocity(model, x, sig, embeds)
        if settings.cfg != 1.0:
            v_neg = predict_velocity(model, x, sig, negatives)
            v = v_neg + settings.cfg * (v - v_neg)
        x = x + (s_next - s) * v
        if k in keep:
            kept.append(x.float().cpu())
    return torch.stack(kept, dim=1)


def _write(path: Path, latents: torch.Tensor, job: TrajectoryJob, settings: TeacherSettings,
           model_id: str) -> None:
    metadata = {"format": TRAJECTORY_VERSION, "seed": str(job.seed), "size": f"{job.width}x{job.height}",
                "teacher": settings.describe(), "model_id": model_id,
                "sigmas": ",".join(f"{s:.6f}" for s in STUDENT_GRID)}
    atomic_write(path, lambda tmp: save_file({TENSOR: latents.contiguous()}, tmp, metadata=metadata))


def _check_jobs(jobs: Sequence[TrajectoryJob], model_id: str) -> None:
    if not model_id:
        raise DistillError("model_id must identify the teacher (base weights, SFT LoRA, strength); "
                           "it is part of the trajectory cache key")
    for job in jobs:
        if job.width % (2 * VAE_FACTOR) or job.height % (2 * VAE_FACTOR) or job.width <= 0 or job.height <= 0:
            raise DistillError(f"trajectory size {job.width}x{job.height}: width and height must be positive "
                               f"multiples of {2 * VAE_FACTOR}")
        if job.embed.ndim != 2:
            raise DistillError(f"trajectory seed {job.seed}: prompt embedding has shape "
                               f"{tuple(job.embed.shape)}; expected (tokens, hidden)")


def ensure_trajectories(
    model: nn.Module,
    jobs: Sequence[TrajectoryJob],
    negative: torch.Tensor,
    cache_dir: str | os.PathLike,
    model_id: str,
    settings: TeacherSettings | None = None,
    *,
    disable: Sequence[str] = (DISTILL_ADAPTER,),
    progress: DoneTotal | None = None,
    batch_size: int = 1,
) -> list[Path]:
    """The cache file of each job, sampling only the missing or bad ones with adapters `disable` off.

    `negative` is the empty-prompt embedding CFG runs against; `progress(done, total)` counts the
    trajectories sampled in this call. Jobs of one size are sampled `batch_size` at a time.
    """
    settings = settings or TeacherSettings()
    _check_jobs(jobs, model_id)
    paths = [trajectory_path(cache_dir, trajectory_key(job, negative, settings, model_id)) for job in jobs]
    todo: dict[Path, TrajectoryJob] = {}
    for path, job in zip(paths, jobs, strict=True):
        if path in todo:
            continue
        problem = trajectory_problem(path, job.shape)
        if problem is None:
            continue
        if problem != "missing":
            log.warning("trajectory cache: rebuilding %s: %s", path, problem)
        todo[path] = job
    if not todo:
        return paths
    by_size: dict[tuple[int, int], list[tuple[Path, TrajectoryJob]]] = {}
    for path, job in todo.items():
        by_size.setdefault((job.width, job.height), []).append((path, job))
    done = 0
    with adapters_disabled(model, disable) if disable else nullcontext():
        for (width, height), items in by_size.items():
            for start in range(0, len(items), max(1, batch_size)):
                chunk = items[start : start + max(1, batch_size)]
                latents = teacher_trajectories(model, [j.embed for _, j in chunk], negative,
                                               [j.seed for _, j in chunk], width, height, settings)
                for (path, job), one in zip(chunk, latents, strict=True):
                    if not torch.isfinite(one).all():
                        raise DistillError(f"the teacher produced non-finite latents for seed {job.seed} at "
                                           f"{width}x{height} ({path.name}); try the model in bf16 or fp32")
                    _write(path, one, job, settings, model_id)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo))
    return paths


def load_trajectories(paths: Sequence[Path]) -> torch.Tensor:
    """Stack cached trajectories (one size) into (B, 9, C, h, w) float32 on the CPU."""
    tensors = [load_file(str(p))[TENSOR] for p in paths]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise DistillError(f"trajectories of different sizes in one batch: {sorted(shapes)}")
    return torch.stack(tensors)


@dataclass
class TrajectorySet:
    """The trajectories a distill run trains on: one cache file per (caption, seed, size), with its prompt."""

    jobs: list[TrajectoryJob]
    paths: list[Path]

    def batch(self, generator: torch.Generator, batch_size: int,
              device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`batch_size` trajectories of one size drawn with `generator`, and their prompt embeddings."""
        first = int(torch.randint(len(self.jobs), (1,), generator=generator))
        same = [i for i, job in enumerate(self.jobs) if job.shape == self.jobs[first].shape]
        draws = torch.randint(len(same), (batch_size - 1,), generator=generator)
        picks = [first] + [same[int(k)] for k in draws]
        latents = load_trajectories([self.paths[i] for i in picks]).to(device)
        return latents, [self.jobs[i].embed.to(device) for i in picks]


def trajectory_set(model: nn.Module, prompts: Sequence[tuple[torch.Tensor, int, int]], seeds: Sequence[int],
                   negative: torch.Tensor, cache_dir: str | os.PathLike, model_id: str,
                   settings: TeacherSettings, **options: Any) -> TrajectorySet:
    """Every (prompt embedding, width, height) x seed as a cached teacher trajectory (`ensure_trajectories`
    options: disable, progress, batch_size)."""
    jobs = [TrajectoryJob(embed, seed, width, height) for embed, width, height in prompts for seed in seeds]
    return TrajectorySet(jobs, ensure_trajectories(model, jobs, negative, cache_dir, model_id, settings,
                                                   **options))

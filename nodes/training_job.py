"""The ZIT Train job: its run and LoRA folders, its work on the job runner's thread, its VRAM reserve in
ComfyUI's accounting, and waiting for it in the prompt thread.

The job: ZIT Train checks everything it can in the prompt thread (the MODEL's file is a trainable Z-Image
transformer without LoRA patches, the settings and the advanced TOML validate, the preview prompts are
encoded into the cache with the dataset's text encoder), asks ComfyUI to unload its models and empty its
cache, then starts the job and returns (or, with `wait`, blocks with progress on the node; Cancel stops the
job, which saves a checkpoint first). The job thread loads its own copy of the transformer from the MODEL's
file with the engine (never ComfyUI's module, never an inference-mode tensor) in the memory plan the
engine's planner chose, trains from the cache only (`trainer.run_models.cache_only_models`: a cache miss is
an error, no text encoder or VAE is loaded), and decodes previews with the VAE file the dataset's VAE was
loaded from. One training job runs at a time.

GPU memory while the user samples during training (ComfyUI's queue keeps running):
- ComfyUI and the job share one process and one CUDA caching allocator. ComfyUI's memory manager counts
  what the job has allocated as used VRAM, so it loads the next model only partly (offloading the rest,
  as in low-VRAM mode) or unloads other models: sampling runs, slower, and the job keeps its memory.
- The job's per-step working memory (activations) is freed between steps and sits in PyTorch's cache,
  which ComfyUI counts as free. While the job runs on CUDA, the pack therefore adds the job's working
  memory (first the memory planner's predicted activations and workspace, as soon as the plan is chosen;
  then the process's peak allocation since the job started minus what is allocated at a step boundary,
  when that conservative figure is larger) to `comfy.model_management.EXTRA_RESERVED_VRAM` (ComfyUI's
  --reserve-vram), and takes it away when the job ends.
- If the two still do not fit, whichever side allocates last gets a CUDA out-of-memory error, and neither
  process crashes: a sampling prompt fails with ComfyUI's OOM message (ComfyUI then unloads its models)
  and the queue goes on; the job ends as "failed" with "out of GPU memory ... the last checkpoint is
  intact", and POST /zit/jobs/{id}/resume continues it from that checkpoint.
- The job never calls ComfyUI's model management: only the prompt thread unloads ComfyUI's models (ZIT
  Train before it starts a job; the resume route asks the prompt worker through ComfyUI's own
  "unload_models" queue flag and the job waits until the worker has taken it).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths

from . import jobs
from .dataset import WORK_FOLDER, ZitDataset, work_root

HINT = ("the dataset changed since ZIT Dataset encoded it, or the cache was cleared: queue the workflow "
        "again so ZIT Dataset re-encodes it")


# ---- names and folders -----------------------------------------------------------------------------------


def runs_root() -> Path:
    return work_root() / "runs"


def lora_dir(name: str) -> Path:
    """<loras>/zit-trainer/<name>: where the run's LoRA files are published."""
    return Path(folder_paths.get_folder_paths("loras")[0]) / WORK_FOLDER / name


def lora_name(name: str, file: str | None = None) -> str:
    """The loras-folder name of a run's final LoRA (or of its `file`), as ComfyUI's LoRA lists spell it."""
    return os.path.join(WORK_FOLDER, name, file or f"{name}.safetensors")


def _used(name: str) -> bool:
    return any(p.exists() and any(p.iterdir()) for p in (runs_root() / name, lora_dir(name)))


def fresh_name(name: str) -> str:
    """The run name, or name_001, name_002, ... when a run of that name already has files."""
    for n in range(100000):
        candidate = name if n == 0 else f"{name}_{n:03d}"
        if not _used(candidate):
            return candidate
    raise jobs.JobError(409, f"no free run name for {name!r}")


# ---- the job ---------------------------------------------------------------------------------------------


def _place(source: Path, target: Path) -> None:
    """Put `source` at `target` atomically: a hard link, else a copy; nothing to do if it is already there."""
    if target.exists():
        if os.path.samefile(source, target):
            return
        a, b = source.stat(), target.stat()
        if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return
    staged = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            os.link(source, staged)
        except OSError:  # another file system, or no hard links
            shutil.copy2(source, staged)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def publish(run_dir: Path, target: Path, name: str) -> None:
    """Mirror the run's step LoRAs and final LoRA into `target`; step files the run no longer keeps go too."""
    from ..trainer.checkpoint import list_checkpoints

    target.mkdir(parents=True, exist_ok=True)
    wanted = {c.lora.name: c.lora for c in list_checkpoints(run_dir, name) if c.lora is not None}
    for final in (run_dir / f"{name}.safetensors", run_dir / f"{name}_merged.safetensors"):
        if final.is_file():
            wanted[final.name] = final
    for file_name, source in wanted.items():
        _place(source, target / file_name)
    steps = re.compile(rf"^{re.escape(name)}-step\d{{6,}}\.safetensors$")
    for entry in target.iterdir():
        if steps.match(entry.name) and entry.name not in wanted:
            entry.unlink(missing_ok=True)


class VramReserve:
    """The job's per-step working memory, kept in ComfyUI's EXTRA_RESERVED_VRAM while it trains on CUDA.

    From the planner's prediction as soon as the plan is known (before the first step allocates anything),
    then from the measured working memory when that is larger.
    """

    def __init__(self, device: str = "") -> None:
        """`device`: the job's model.device ('' = ComfyUI's); a job on another GPU reserves nothing."""
        self.added, self.device = 0, device

    def _shared(self) -> bool:
        """Whether the job trains on the GPU ComfyUI samples on."""
        import torch

        if not torch.cuda.is_available():
            return False
        if not self.device:
            return True
        import comfy.model_management as mm

        return torch.device(self.device) == mm.get_torch_device()

    def start(self) -> None:
        """Measure peaks from the job's start (ComfyUI never reads the peak statistics)."""
        import torch

        if self._shared():
            torch.cuda.reset_peak_memory_stats()

    def expect(self, working: int) -> None:
        """Reserve at least `working` bytes (the planner's activations + workspace) from now on."""
        if self._shared():
            self._raise_to(working)

    def update(self) -> None:
        import torch

        if self._shared():
            self._raise_to(max(0, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()))

    def _raise_to(self, working: int) -> None:
        if working > self.added:
            import comfy.model_management as mm

            mm.EXTRA_RESERVED_VRAM += working - self.added
            self.added = working

    def release(self) -> None:
        if self.added:
            import comfy.model_management as mm

            mm.EXTRA_RESERVED_VRAM -= self.added
            self.added = 0


class _NodeContext:
    """The engine's JobContext as the node's job sees it: checkpoints are published to the loras folder
    before their event goes out (with their loras names); the plan and progress keep the VRAM reserve
    current."""

    def __init__(self, ctx: Any, cfg: Any, reserve: VramReserve) -> None:
        self.ctx, self.reserve = ctx, reserve
        self.run_dir, self.name = Path(cfg.run_dir), cfg.save.name

    @property
    def stop_requested(self) -> bool:
        return self.ctx.stop_requested

    def emit(self, kind: str, **data: Any) -> None:
        if kind == "checkpoint":
            try:
                publish(self.run_dir, lora_dir(self.name), self.name)
                step_file = Path(data["path"]).name
                data.update(lora_name=lora_name(self.name, step_file), final=lora_name(self.name))
            except OSError as exc:
                self.ctx.emit("log", message=f"could not put the LoRA into the loras folder: {exc}")
        elif kind == "progress":
            self.reserve.update()
        elif kind == "plan":
            self.reserve.expect(int(data.get("working_bytes", 0)))
        self.ctx.emit(kind, **data)


def _wait_for_unload(ctx: Any) -> None:
    """Ask ComfyUI's prompt worker to unload its models (the flag /free sets); wait until it took the flag."""
    import time

    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    queue = getattr(instance, "prompt_queue", None)
    if queue is None:
        return
    queue.set_flag("unload_models", True)
    ctx.emit("log", message="waiting for ComfyUI's prompt worker to unload its models")
    while "unload_models" in queue.get_flags(reset=False) and not ctx.stop_requested:
        time.sleep(0.2)


@dataclass(frozen=True)
class Work:
    """A run's job work: train from the cache only, publishing LoRAs into the loras folder as they are saved.

    `Work(cfg, data)(resume)` is the work function. resume False / True come from ZIT Train (the prompt
    thread, which has unloaded ComfyUI's models already); a training-state folder comes from the resume
    route, so that job first has ComfyUI's prompt worker unload its models.
    """

    cfg: Any
    data: ZitDataset

    def __call__(self, resume: bool | str) -> Any:
        return functools.partial(self.run, resume=resume)

    def run(self, ctx: Any, resume: bool | str) -> Any:
        import torch

        from ..trainer.loop import train
        from ..trainer.run_models import cache_only_models

        if isinstance(resume, str):
            _wait_for_unload(ctx)
        reserve = VramReserve(self.cfg.model.device)
        reserve.start()
        models = functools.partial(cache_only_models, vae_id=self.data.vae_id, te_id=self.data.te_id,
                                   vae=self.data.vae_file, hint=HINT)
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the job's own thread, made explicit
                return train(self.cfg, _NodeContext(ctx, self.cfg, reserve), resume, models=models,
                             dataset=self.data.dataset)
        finally:
            reserve.release()


def make_run(cfg: Any, data: ZitDataset) -> jobs.Run:
    """The jobs-registry record of a run: its files, its LoRA's loras name and its work."""
    name = cfg.save.name
    return jobs.Run(name=name, run_dir=Path(cfg.run_dir), lora_name=lora_name(name),
                    steps=cfg.optim.steps, work=Work(cfg, data))


# ---- waiting in the prompt thread ------------------------------------------------------------------------


def wait_with_progress(job: Any, steps: int) -> None:
    """Block until the job ends, with its progress and latest preview on the node; Cancel stops the job."""
    import comfy.model_management as mm
    import comfy.utils
    from PIL import Image

    bar = comfy.utils.ProgressBar(steps)
    shown = None
    try:
        while not job.wait(0.5):
            mm.throw_exception_if_processing_interrupted()
            last = job.snapshot()["last"]
            preview = last.get("preview", {}).get("path")
            image = None
            if preview and preview != shown:
                shown = preview
                with Image.open(preview) as img:
                    image = ("PNG", img.copy(), 512)
            bar.update_absolute(last.get("progress", {}).get("step", 0), steps, image)
    except mm.InterruptProcessingException:
        job.stop()
        job.wait()
        raise
    bar.update_absolute(job.snapshot()["last"].get("progress", {}).get("step", 0), steps)

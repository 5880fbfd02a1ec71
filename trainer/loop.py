"""The training loop: config in, LoRA checkpoints, previews and events out. Runs on any job runner thread."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import RUN_RECORD, save_checkpoint
from .config import TrainConfig, config_to_dict
from .data import Dataset
from .distill import distill_terms, merge_sft_and_distill
from .distributed import SINGLE, Processes
from .files import atomic_write
from .job import JobContext
from .lora.writing import write_lora
from .model import adapter_disabled, adapters_disabled, lora_from_peft
from .plots import loss_curve_png
from .previews import preview_model_rows
from .run_models import DTYPES, OpenModels, TrainingError
from .run_setup import ADAPTER, TRAINED, RunSetup
from .sampling import preview_grid
from .step_loss import flow_matching_loss

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves: the final LoRA file, the step reached, the loss history."""

    lora_path: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    stopped: bool = False
    previews: list[Path] = field(default_factory=list)
    health: list[tuple[int, float]] = field(default_factory=list)  # (step, turbo health) as measured


class Trainer(RunSetup):
    """One training run: built by RunSetup from the config, then `run()` the step loop."""

    # ---- the step ---------------------------------------------------------------------------------

    def _autocast(self):
        dtype = DTYPES[self.cfg.model.dtype]
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_batch_loss(self) -> torch.Tensor:
        if self.trajectories is not None:
            t = self.cfg.turbo
            rows = self.procs.rows(self.cfg.data.batch_size)  # this process's rows of the global batch
            latents, embeds = self.trajectories.batch(self.generator, self.global_batch, self.device)
            latents, embeds = latents[rows], embeds[rows]
            with self._autocast():
                return distill_terms(self.model, latents, embeds, self.generator, t.rollout,
                                     t.rollout_weight).total
        rows = self.procs.rows(self.cfg.data.batch_size)
        plan = self.sampler.next_batch()
        batch = self.data.load_batch(replace(plan, indices=plan.indices[rows],
                                             drop_caption=plan.drop_caption[rows]))
        return flow_matching_loss(self.model, batch.latents, batch.text_embeds, self.cfg.objective,
                                  self.generator, self.device, self.cfg.turbo.dg_scale, self._autocast,
                                  lambda: adapters_disabled(self.model, [TRAINED]), rows, len(plan.indices))

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        o = self.cfg.optim
        total = torch.zeros(1)
        for _ in range(o.grad_accum):
            loss = self._micro_batch_loss() / o.grad_accum
            if torch.isfinite(loss):
                loss.backward()
            total += loss.detach().float().cpu()
        # every process gets the mean loss and LoRA gradients of the global batch (alone: unchanged)
        self.procs.average_([total] + [p.grad for p in self.params.values() if p.grad is not None])
        if not torch.isfinite(total):
            raise TrainingError(f"loss became {total.item()} at step {self.step + 1}: lower optim.lr or "
                                "use max_grad_norm; the last checkpoint is intact")
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), o.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.step)  # the 0-based index of the optimizer step just taken
        self.step += 1
        return total.item()

    # ---- outputs ----------------------------------------------------------------------------------

    def trained_lora(self):
        """The LoRA as it would be saved now (EMA weights when EMA is on), in canonical form."""
        with self.ema.swapped() if self.ema is not None else nullcontext():
            lora = lora_from_peft(self.model, TRAINED)
        lora.metadata.update({
            "zit.trainer": f"zit-trainer {__version__}",
            "zit.step": str(self.step),
            "zit.base_model": self.models.base_id,
            "zit.mode": self.cfg.turbo.mode,
            "zit.family": self.family.name,
            **({"zit.turbo_health": f"{self.turbo_health:.4f}"} if self.turbo_health is not None else {}),
            "zit.config": json.dumps(config_to_dict(self.cfg)),
        })
        return lora

    def _write_lora(self, path: Path) -> None:
        lora = self.trained_lora()
        write_lora(lora, path, dialect=self.cfg.lora.save_dialect, dtype=DTYPES[self.cfg.lora.save_dtype])

    def save(self) -> Path:
        """A step checkpoint (LoRA + training state, atomically) and the run's final-name LoRA; written by
        process 0 while the others wait."""
        s = self.cfg.save
        final = self.run_dir / f"{s.name}.safetensors"
        if not self.procs.is_main:
            self.procs.barrier()
            return final
        objects = self.objects if s.state else None
        record = {RUN_RECORD: {"processes": self.procs.world, "global_batch": self.global_batch}}
        ckpt = save_checkpoint(self.run_dir, s.name, self.step, self._write_lora, objects,
                               {**config_to_dict(self.cfg), **record}, s.keep_last)
        atomic_write(final, lambda tmp: shutil.copyfile(ckpt.lora, tmp))
        if self.trajectories is not None and not self.continues_sft:  # also SFT + distill, merged exactly
            distill = self.trained_lora()
            merged = merge_sft_and_distill(self.adapter, distill, self.cfg.turbo.adapter_strength,
                                           distill.metadata)
            write_lora(merged, self.run_dir / f"{s.name}_merged.safetensors",
                       dialect=self.cfg.lora.save_dialect, dtype=DTYPES[self.cfg.lora.save_dtype])
        self._emit("checkpoint", step=self.step, path=str(ckpt.lora), lora=str(final))
        self.procs.barrier()
        return final

    @torch.no_grad()
    def preview(self, tag: str | None = None) -> Path | None:
        """Sample the preview prompts exactly as base + LoRA (adapter off), turbo and optionally de-turbo."""
        p = self.cfg.preview
        if not p.prompts:
            return None
        rows = preview_model_rows(self.model, p, self.family.distilled, self.trained_lora, self.device,
                                  DTYPES[self.cfg.model.dtype], self.plan.storage, self._log)
        vae = self.models.vae_factory()
        self.model.eval()
        with (self.ema.swapped() if self.ema is not None else nullcontext(),
              adapter_disabled(self.model, ADAPTER) if self.drops_adapter else nullcontext(),
              self._autocast()):
            image = preview_grid(rows, vae, self.preview_embeds, self.empty_embed,
                                 [p.seed + i for i in range(len(p.prompts))], p.width, p.height,
                                 title=f"step {self.step}"
                                 + (", training adapter off" if self.drops_adapter else ""),
                                 prompts=p.prompts)
        self.model.train()
        labels = [r.label for _, r in rows]
        del vae, rows
        path = self.run_dir / "previews" / f"{tag or f'step{self.step:06d}'}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.previews.append(path)
        self._emit("preview", step=self.step, path=str(path), rows=labels,
                   prompts=list(p.prompts))
        return path

    # ---- the loop ---------------------------------------------------------------------------------

    def _on_main(self, work: Any) -> None:
        """Run `work` on process 0 while the others wait (alone: just run it)."""
        if self.procs.is_main:
            work()
        self.procs.barrier()

    def _stats(self, times: deque) -> dict[str, float]:
        steps_left = self.cfg.optim.steps - self.step
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        mem = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        return {"it_s": rate, "eta_s": steps_left / rate if rate else math.inf, "mem_gb": mem}

    def run(self) -> TrainResult:
        """Train to optim.steps (or until stopped), saving and previewing on schedule; always saves last."""
        cfg, times = self.cfg, deque(maxlen=20)
        if self.step == 0 and cfg.preview.every:
            self._on_main(lambda: self.preview("step000000"))
        times.append(time.perf_counter())
        stopped = False
        while self.step < cfg.optim.steps:
            if self.procs.any(self.ctx is not None and self.ctx.stop_requested):
                stopped = True
                break
            loss = self.train_step()
            self.losses.append(loss)
            times.append(time.perf_counter())
            self._emit("progress", step=self.step, steps=cfg.optim.steps, loss=loss,
                       lr=self.scheduler.get_last_lr()[0], **self._stats(times))
            if cfg.save.every and self.step % cfg.save.every == 0 and self.step < cfg.optim.steps:
                self.save()
            if self.health is not None and self.step % cfg.preview.health_every == 0:
                self._on_main(self.measure_health)
            if cfg.preview.every and self.step % cfg.preview.every == 0:
                self._on_main(self.preview)
        final = self.save()
        if self.losses and self.procs.is_main:
            meter = self.health
            loss_curve_png(self.losses, self.run_dir / "loss.png", health=self.health_history,
                           first_step=self.step - len(self.losses) + 1,
                           threshold=meter.threshold if meter else None, scale=meter.scale if meter else "")
        return TrainResult(final, self.step, self.losses, stopped, self.previews, self.health_history)


def train(cfg: TrainConfig, ctx: JobContext | None = None, resume: bool | str = False, *,
          models: OpenModels | None = None, dataset: Dataset | None = None,
          processes: Processes = SINGLE) -> TrainResult:
    """Run a whole training job from a validated config (the CLI and the ComfyUI node both call this)."""
    return Trainer(cfg, ctx, resume, models=models, dataset=dataset, processes=processes).run()

"""The training loop: config in, LoRA checkpoints, previews and events out. Runs on any job runner thread."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import TrainingObjects, find_latest_checkpoint, load_training_state, save_checkpoint
from .config import TrainConfig, config_diff, config_from_dict, config_to_dict
from .data import Dataset, build_cache, cached_text_embeddings
from .distill import TeacherSettings, distill_terms, merge_sft_and_distill
from .distill_cache import TrajectorySet
from .distill_run import (
    build_trajectories,
    distill_meter,
    read_prompt_list,
    teacher_identity,
    teacher_prompts,
)
from .files import atomic_write
from .health import TeacherDistance, TurboHealth
from .job import JobContext
from .lora.formats import read_lora, write_lora
from .memory import MemoryPlan, transformer_spec
from .model import (
    adapter_disabled,
    adapters_disabled,
    attach_frozen_adapter,
    inject_lora,
    load_lora_into_peft,
    lora_from_peft,
)
from .model.family import resolve_family
from .model.swap import BlockSwap
from .optim import Ema, build_optimizer, build_scheduler
from .plots import loss_curve_png
from .previews import check_turbo_model, preview_model_rows
from .run_models import (
    DTYPES,
    OpenModels,
    TrainingError,
    config_for_plan,
    open_models,
    pick_device,
    plan_run_memory,
    scan_dataset,
)
from .sampling import preview_grid
from .step_loss import flow_matching_loss

log = logging.getLogger(__name__)

TRAINED = "zit"  # peft adapter name of the LoRA being trained
ADAPTER = "adapter"  # peft adapter name of the frozen training adapter


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves: the final LoRA file, the step reached, the loss history."""

    lora_path: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    stopped: bool = False
    previews: list[Path] = field(default_factory=list)
    health: list[tuple[int, float]] = field(default_factory=list)  # (step, turbo health) as measured


class Trainer:
    """One training run: build everything from the config, then `run()` the step loop."""

    def __init__(self, cfg: TrainConfig, ctx: JobContext | None = None, resume: bool | str = False, *,
                 models: OpenModels | None = None, dataset: Dataset | None = None,
                 plan: MemoryPlan | None = None):
        """`models` builds the run's Models (default `open_models`); `dataset` is the folder as a front end
        already scanned it with cfg.data's settings (default: scan it here); `plan` overrides the memory
        planner (benchmarks)."""
        self.ctx = ctx
        self.device = pick_device()
        # refused here, before any folder or weight
        self.plan = plan or plan_run_memory(cfg, self.device, dataset, self._emit)
        self.cfg = cfg = config_for_plan(cfg, self.plan)
        self.run_dir = Path(cfg.run_dir)
        self.family = resolve_family(cfg.model.family, cfg.model.transformer)
        self._log(f"model: {self.family.how}")
        if cfg.turbo.mode == "base" and cfg.preview.turbo_model:
            check_turbo_model(cfg.preview.turbo_model, transformer_spec(cfg))
        self.losses: list[float] = []
        self.previews: list[Path] = []
        self.step = 0
        # Bad data and a bad adapter file are refused before a 12 GB model is loaded.
        self.dataset = dataset if dataset is not None else scan_dataset(cfg.data, self._log)
        self.adapter = self._read_adapter()
        distill = cfg.turbo.mode == "distill"
        self.prompt_list = read_prompt_list(cfg.turbo.teacher_prompts) if cfg.turbo.teacher_prompts else []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._emit("log", message=f"loading the model on {self.device}")
        self.models = (models or open_models)(cfg, self.device, self.plan)
        self.model = self.models.transformer
        self._prepare_data()
        self._prepare_lora()
        self.trajectories = self._prepare_trajectories() if distill else None
        self.health = self._prepare_health()
        self.turbo_health: float | None = None
        self.health_history: list[tuple[int, float]] = []
        self._prepare_optimization()
        if resume:
            self._resume(resume)

    # ---- set-up -----------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        self._emit("log", message=message)

    def _emit(self, kind: str, **data: Any) -> None:
        if self.ctx is not None:
            self.ctx.emit(kind, **data)
        elif kind == "log":
            log.info(data.get("message", ""))

    def _progress(self, stage: str, done: int, total: int) -> None:
        self._emit("cache", stage=stage, done=done, total=total)

    def _read_adapter(self):
        """The training adapter / SFT LoRA, checked against the transformer's header before loading."""
        t = self.cfg.turbo
        return read_lora(t.adapter, spec=transformer_spec(self.cfg)) if t.uses_adapter else None

    def _prepare_data(self) -> None:
        d, cache, m = self.cfg.data, self.cfg.cache_path, self.models
        self.data = self.sampler = None
        if self.dataset is not None:
            self.data = build_cache(self.dataset, cache, m.encode_image, m.encode_text, m.vae_id, m.te_id,
                                    progress=self._progress)
            self.sampler = self.data.sampler(d.batch_size, seed=self.cfg.optim.seed, repeats=d.repeats,
                                             drop_last=d.drop_last, caption_dropout=d.caption_dropout)
            self._emit("log", message=f"dataset: {len(self.data)} samples, {len(self.sampler)} batches per "
                       "epoch")
        prompts = list(self.cfg.preview.prompts) + [""]
        embeds = cached_text_embeddings(prompts, cache, m.encode_text, m.te_id)
        self.preview_embeds, self.empty_embed = embeds[:-1], embeds[-1]
        self.teacher_prompts = (teacher_prompts(self.data, self.prompt_list, max(d.resolutions), cache,
                                                m.encode_text, m.te_id)
                                if self.cfg.turbo.mode == "distill" else [])
        m.encode_image.release()
        m.encode_text.release()

    def _prepare_lora(self) -> None:
        cfg = self.cfg
        self.model.requires_grad_(False)
        targets = cfg.lora.target_regex if cfg.lora.targets == "custom" else cfg.lora.targets
        # distill_into = "sft": the SFT LoRA itself is trained (it is the teacher only before step 1).
        self.continues_sft = cfg.turbo.mode == "distill" and cfg.turbo.distill_into == "sft"
        if self.continues_sft:
            load_lora_into_peft(self.model, self.adapter, TRAINED, trainable=True,
                                strength=cfg.turbo.adapter_strength)
        else:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(cfg.optim.seed)  # peft draws A from the global RNG: make it the run's seed
                inject_lora(self.model, cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init,
                            adapter_name=TRAINED)
        self.has_adapter = self.adapter is not None and not self.continues_sft
        # The training adapter is dropped at inference; distill's SFT LoRA is part of the student.
        self.drops_adapter = self.has_adapter and cfg.turbo.mode != "distill"
        if self.has_adapter:
            attach_frozen_adapter(self.model, self.adapter, cfg.turbo.adapter_strength, name=ADAPTER)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        for p in self.params.values():
            p.data = p.data.to(self.device, torch.float32)
        for name, p in self.model.named_parameters():  # frozen adapters in swapped blocks were built on CPU
            if "lora_" in name and p.device != self.device:
                p.data = p.data.to(self.device)
        self.swap = (BlockSwap(self.model, self.device, self.plan.swap_blocks, self.plan.prefetch)
                     if self.plan.swap_blocks else None)
        if cfg.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()

    def _prepare_trajectories(self) -> TrajectorySet:
        """Distill mode: the teacher (base + SFT LoRA) samples every prompt x seed once; cached by content,
        so a resumed or repeated run reuses them (a resumed distill_into = "sft" run finds them cached)."""
        t = self.cfg.turbo
        self._emit("log", message=f"distill: teacher trajectories for {len(self.teacher_prompts)} prompts x "
                   f"{t.teacher_seeds} seeds ({t.teacher_steps} steps, cfg {t.teacher_cfg:g})")
        teacher = teacher_identity(self.models.base_id, self.adapter, t.adapter_strength,
                                   self.cfg.model.dtype)
        seed = self.cfg.optim.seed
        with self._autocast():
            return build_trajectories(
                self.model, self.teacher_prompts, range(seed, seed + t.teacher_seeds),
                self.empty_embed.to(self.device), self.cfg.cache_path, teacher,
                TeacherSettings(t.teacher_steps, t.teacher_cfg), [] if self.continues_sft else [TRAINED],
                lambda done, total: self._progress("trajectories", done, total))

    def _prepare_health(self) -> TurboHealth | TeacherDistance | None:
        """The turbo-health meter: in distill mode the 8-step sample's distance to the teacher relative to
        step 0 (reference taken now, before any resume); else x0 drift on the preview prompts and seeds."""
        p = self.cfg.preview
        if not p.health_every or not self.family.distilled:
            return None
        if self.trajectories is not None:
            meter = distill_meter(self.model, self.trajectories, self.device,
                                  reference_disable=[] if self.continues_sft else [TRAINED])
            with self._autocast():
                meter.reference()
            return meter
        embeds = list(self.preview_embeds) or [self.empty_embed]
        return TurboHealth(self.model, [e.to(self.device) for e in embeds],
                           [p.seed + i for i in range(len(embeds))], p.health_size, p.health_size,
                           disable=[ADAPTER] if self.drops_adapter else [])

    @torch.no_grad()
    def measure_health(self) -> float:
        """Turbo health now (EMA weights when EMA is on): sent as an event, warned past the limit."""
        with self.ema.swapped() if self.ema is not None else nullcontext(), self._autocast():
            value = self.health.measure()
        self.turbo_health = value
        self.health_history.append((self.step, value))
        self._emit("health", step=self.step, health=value, threshold=self.health.threshold,
                   scale=self.health.scale)
        warning = self.health.warning(value)
        if warning:
            self._emit("log", message=f"step {self.step}: {warning}")
        return value

    def _prepare_optimization(self) -> None:
        o = self.cfg.optim
        params = list(self.params.values())
        self.optimizer = build_optimizer(params, o, self.device)
        self.scheduler = build_scheduler(self.optimizer, o)
        self.ema = Ema(params, o.ema_decay) if o.ema else None
        self.generator = torch.Generator().manual_seed(o.seed)
        self.objects = TrainingObjects(self.params, self.optimizer, self.scheduler, self.ema, self.sampler,
                                       {"noise": self.generator})

    def _resume(self, resume: bool | str) -> None:
        ckpt = find_latest_checkpoint(self.run_dir, self.cfg.save.name) if resume is True else None
        state = Path(resume) if isinstance(resume, str) else (ckpt.state if ckpt else None)
        if state is None:
            raise TrainingError(f"nothing to resume in {self.run_dir}: no saved training state")
        info = load_training_state(state, self.objects)
        self.step = info.step
        if info.config:
            for line in config_diff(config_from_dict(info.config, str(state)), self.cfg):
                self._emit("log", message=f"resume: {line}")
        self._emit("log", message=f"resumed from {state.name} at step {self.step}")

    # ---- the step ---------------------------------------------------------------------------------

    def _autocast(self):
        dtype = DTYPES[self.cfg.model.dtype]
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _micro_batch_loss(self) -> torch.Tensor:
        if self.trajectories is not None:
            t = self.cfg.turbo
            latents, embeds = self.trajectories.batch(self.generator, self.cfg.data.batch_size, self.device)
            with self._autocast():
                return distill_terms(self.model, latents, embeds, self.generator, t.rollout,
                                     t.rollout_weight).total
        batch = self.data.load_batch(self.sampler.next_batch())
        return flow_matching_loss(self.model, batch.latents, batch.text_embeds, self.cfg.objective,
                                  self.generator, self.device, self.cfg.turbo.dg_scale, self._autocast,
                                  lambda: adapters_disabled(self.model, [TRAINED]))

    def train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        o = self.cfg.optim
        total = 0.0
        for _ in range(o.grad_accum):
            loss = self._micro_batch_loss() / o.grad_accum
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {self.step + 1}: lower optim.lr or "
                                    "use max_grad_norm; the last checkpoint is intact")
            loss.backward()
            total += loss.item()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params.values(), o.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.step)  # the 0-based index of the optimizer step just taken
        self.step += 1
        return total

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
        """A step checkpoint (LoRA + training state, atomically) and the run's final-name LoRA."""
        s = self.cfg.save
        objects = self.objects if s.state else None
        ckpt = save_checkpoint(self.run_dir, s.name, self.step, self._write_lora, objects,
                               config_to_dict(self.cfg), s.keep_last)
        final = self.run_dir / f"{s.name}.safetensors"
        atomic_write(final, lambda tmp: shutil.copyfile(ckpt.lora, tmp))
        if self.trajectories is not None and not self.continues_sft:  # also SFT + distill, merged exactly
            distill = self.trained_lora()
            merged = merge_sft_and_distill(self.adapter, distill, self.cfg.turbo.adapter_strength,
                                           distill.metadata)
            write_lora(merged, self.run_dir / f"{s.name}_merged.safetensors",
                       dialect=self.cfg.lora.save_dialect, dtype=DTYPES[self.cfg.lora.save_dtype])
        self._emit("checkpoint", step=self.step, path=str(ckpt.lora), lora=str(final))
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
                                 [p.seed + i for i in range(len(p.prompts))], p.width, p.height)
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

    def _stats(self, times: deque) -> dict[str, float]:
        steps_left = self.cfg.optim.steps - self.step
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        mem = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        return {"it_s": rate, "eta_s": steps_left / rate if rate else math.inf, "mem_gb": mem}

    def run(self) -> TrainResult:
        """Train to optim.steps (or until stopped), saving and previewing on schedule; always saves last."""
        cfg, times = self.cfg, deque(maxlen=20)
        if self.step == 0 and cfg.preview.every:
            self.preview("step000000")
        times.append(time.perf_counter())
        stopped = False
        while self.step < cfg.optim.steps:
            if self.ctx is not None and self.ctx.stop_requested:
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
                self.measure_health()
            if cfg.preview.every and self.step % cfg.preview.every == 0:
                self.preview()
        final = self.save()
        if self.losses:
            meter = self.health
            loss_curve_png(self.losses, self.run_dir / "loss.png", health=self.health_history,
                           threshold=meter.threshold if meter else None, scale=meter.scale if meter else "")
        return TrainResult(final, self.step, self.losses, stopped, self.previews, self.health_history)


def train(cfg: TrainConfig, ctx: JobContext | None = None, resume: bool | str = False, *,
          models: OpenModels | None = None, dataset: Dataset | None = None) -> TrainResult:
    """Run a whole training job from a validated config (the CLI and the ComfyUI node both call this)."""
    return Trainer(cfg, ctx, resume, models=models, dataset=dataset).run()

"""Building a training run from its config: the checks that come before anything heavy, the models,
the cached data, the adapters and LoRA, the optimizer and, on resume, the saved state."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    RUN_RECORD,
    TrainingObjects,
    find_latest_checkpoint,
    load_training_state,
    read_run_record,
)
from .config import TrainConfig, config_diff, config_from_dict, config_to_dict
from .data import Dataset, build_cache, cached_text_embeddings, encode_share
from .distill import TeacherSettings
from .distill_cache import TrajectorySet
from .distill_run import (
    build_trajectories,
    distill_meter,
    read_prompt_list,
    teacher_identity,
    teacher_prompts,
)
from .distributed import SINGLE, Processes, check_parallel_run, check_split, parallel_summary, resume_rule
from .health import TeacherDistance, TurboHealth
from .job import JobContext
from .lora.formats import read_lora
from .memory import MemoryPlan, transformer_spec
from .model import attach_frozen_adapter, inject_lora, load_lora_into_peft
from .model.family import family_for_mode, resolve_family
from .model.swap import BlockSwap
from .optim import Ema, build_optimizer, build_scheduler
from .preflight import check_output_folders
from .previews import check_turbo_model
from .run_models import (
    OpenModels,
    TrainingError,
    config_for_plan,
    open_models,
    pick_device,
    plan_run_memory,
    scan_dataset,
)

log = logging.getLogger(__name__)

TRAINED = "zit"  # peft adapter name of the LoRA being trained
ADAPTER = "adapter"  # peft adapter name of the frozen training adapter


class RunSetup:
    """Everything a run needs before its first step; `Trainer` adds the steps and the outputs."""


    def __init__(self, cfg: TrainConfig, ctx: JobContext | None = None, resume: bool | str = False, *,
                 models: OpenModels | None = None, dataset: Dataset | None = None,
                 plan: MemoryPlan | None = None, processes: Processes = SINGLE):
        """`models` builds the run's Models (default `open_models`); `dataset` is the folder as a front end
        already scanned it with cfg.data's settings (default: scan it here); `plan` overrides the memory
        planner (benchmarks); `processes`: this process's place in a multi-process run."""
        self.ctx, self.procs = ctx, processes
        self.device = processes.device or pick_device(cfg.model.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # this thread's current GPU (streams, stats, caches)
        check_parallel_run(cfg, processes, json.dumps(config_to_dict(cfg), sort_keys=True))
        if processes.parallel:
            self._log(parallel_summary(cfg, processes))
        self.run_dir, self.global_batch = Path(cfg.run_dir), cfg.data.batch_size * processes.world
        check_output_folders(cfg)  # a folder it cannot write is refused before anything loads
        self.state = self._state_to_resume(resume, cfg.save.name) if resume else None
        # refused here, before any folder or weight
        self.plan = plan or plan_run_memory(cfg, self.device, dataset, self._emit)
        self.cfg = cfg = config_for_plan(cfg, self.plan)
        self.family = family_for_mode(resolve_family(cfg.model.family, cfg.model.transformer), cfg.turbo.mode)
        self._log(f"model: {self.family.how}")
        if cfg.turbo.mode == "base" and cfg.preview.turbo_model:
            check_turbo_model(cfg.preview.turbo_model, transformer_spec(cfg))
        self.losses: list[float] = []
        self.previews: list[Path] = []
        self.step = 0
        # Bad data and a bad adapter file are refused before a 12 GB model is loaded.
        self.dataset = dataset if dataset is not None else scan_dataset(cfg.data, self._log)
        self.adapter = self._read_adapter()
        if self.dataset is not None:
            sizes = {b: n * cfg.data.repeats for b, n in self.dataset.bucket_counts().items()}
            check_split(sizes, cfg.data.batch_size, processes.world, cfg.data.drop_last)
        distill = cfg.turbo.mode == "distill"
        self.prompt_list = read_prompt_list(cfg.turbo.teacher_prompts) if cfg.turbo.teacher_prompts else []
        if processes.is_main:
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
        if self.state is not None:
            self._resume(self.state)

    # ---- set-up -----------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        self._emit("log", message=message)

    def _emit(self, kind: str, **data: Any) -> None:
        if not self.procs.is_main:  # process 0 reports for the job
            return
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
            if self.procs.parallel:  # each process encodes its share, then all read the shared cache
                encode_share(self.dataset, cache, m.encode_image, m.encode_text, m.vae_id, m.te_id,
                             self.procs.rank, self.procs.world, self._progress)
                self.procs.barrier()
            self.data = build_cache(self.dataset, cache, m.encode_image, m.encode_text, m.vae_id, m.te_id,
                                    progress=self._progress)
            self.sampler = self.data.sampler(self.global_batch, seed=self.cfg.optim.seed, repeats=d.repeats,
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
        seeds = range(self.cfg.optim.seed, self.cfg.optim.seed + t.teacher_seeds)
        rank, world = self.procs.share
        every = self.teacher_prompts
        for prompts in ([every[rank::world], every] if world > 1 else [every]):
            # several processes: each samples its share (maybe none), then all read the shared cache
            if not prompts and prompts is not every:
                self.procs.barrier()
                continue
            with self._autocast():
                found = build_trajectories(
                    self.model, prompts, seeds, self.empty_embed.to(self.device), self.cfg.cache_path,
                    teacher, TeacherSettings(t.teacher_steps, t.teacher_cfg),
                    [] if self.continues_sft else [TRAINED],
                    lambda done, total: self._progress("trajectories", done, total))
            self.procs.barrier()
        return found

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

    def _state_to_resume(self, resume: bool | str, name: str) -> Path:
        """The training state a resume continues, checked against this run's global batch before loading."""
        ckpt = find_latest_checkpoint(self.run_dir, name) if resume is True else None
        state = Path(resume) if isinstance(resume, str) else (ckpt.state if ckpt else None)
        if state is None:
            raise TrainingError(f"nothing to resume in {self.run_dir}: no saved training state")
        why = resume_rule(read_run_record(state), self.global_batch, self.procs.world)
        if why:
            raise TrainingError(f"resume {state}: {why}")
        return state

    def _resume(self, state: Path) -> None:
        info = load_training_state(state, self.objects)
        self.step = info.step
        if info.config:
            saved = {k: v for k, v in info.config.items() if k != RUN_RECORD}
            for line in config_diff(config_from_dict(saved, str(state)), self.cfg):
                self._emit("log", message=f"resume: {line}")
        self._emit("log", message=f"resumed from {state.name} at step {self.step}")

"""The training config's fields: one frozen dataclass per section, each field with its default, doc and rules,
and the table (`FIELDS`) that validation, the TOML writer and the ComfyUI node read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(default: Any, doc: str, **rules: Any) -> Any:
    """A config field: its default, its one-line doc and its validation rules (see FieldSpec)."""
    return field(default=default, metadata={"doc": doc, **rules})


MEMORY_PLANS = ("auto", "bf16", "fp8", "bf16_swap", "fp8_swap", "nf4", "int8")
"""model.memory choices: auto, or a storage of the frozen base (with _swap: block swap on)."""

_NAME_RE = r'^[^\\/:*?"<>|.\s][^\\/:*?"<>|]*$'


@dataclass(frozen=True)
class ModelConfig:
    """The base model: ZIT as a ComfyUI single file, a diffusers folder, or the built-in tiny one."""

    transformer: str = _opt("", "ComfyUI single .safetensors file, diffusers folder, or 'tiny' (required)")
    text_encoder: str = _opt("", "Qwen3-4B path; '' = the text_encoder folder beside a diffusers transformer")
    vae: str = _opt("", "Flux VAE path; '' = the vae folder beside a diffusers transformer")
    family: str = _opt(
        "auto",
        "which Z-Image the transformer is: auto = what its files say (else Turbo, logged as assumed); "
        "turbo; base (the non-distilled Z-Image); deturbo (Z-Image-De-Turbo); refused if the files disagree",
        choices=("auto", "turbo", "base", "deturbo"),
    )
    dtype: str = _opt(
        "bf16",
        "compute dtype of the frozen base (LoRA weights are always fp32)",
        choices=("bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward to save memory")
    device: str = _opt(
        "", "the device to train on: '' = the first CUDA GPU (else the CPU), or cpu, cuda:N; a multi-process "
        "run takes each process's device from its launcher", pattern=r"^$|^cpu$|^cuda(:\d+)?$",
        pattern_msg='must be "", "cpu", "cuda" or "cuda:N"',
    )
    memory: str = _opt(
        "auto",
        "how the frozen base is held on the GPU: auto = the planner picks the first plan that fits; "
        "bf16 = block weights in model.dtype; fp8 = block weights in float8; *_swap = only "
        "model.swap_blocks main blocks on the GPU, the rest streamed from CPU; nf4/int8 = bitsandbytes",
        choices=MEMORY_PLANS,
    )
    memory_preference: str = _opt(
        "quality",
        "order auto tries plans in: quality (bf16, bf16_swap, fp8_swap) or speed (bf16, fp8, fp8_swap)",
        choices=("quality", "speed"),
    )
    vram: str = _opt(
        "",
        "GPU memory budget for the planner, e.g. \"12GB\" or \"11.5GiB\"; '' = the device's free memory",
        pattern=r"^$|^\s*\d+(\.\d+)?\s*([KMGT]i?B?)?\s*$",
        pattern_msg='must be a size such as "12GB", "11.5GiB" or "12000MB"',
    )
    swap_blocks: int = _opt(
        0, "main blocks kept on the GPU in the *_swap plans (0 = the planner picks)", ge=0, le=29
    )
    swap_prefetch: int = _opt(1, "blocks copied to the GPU ahead of use in the *_swap plans", ge=1, le=4)
    lower_resolution: bool = _opt(
        False, "auto may train at a lower resolution than data.resolutions when nothing else fits"
    )


@dataclass(frozen=True)
class DataConfig:
    """The image folder, its captions and batching."""

    dataset: str = _opt("", "folder of training images (required)")
    caption: str = _opt("", "one caption for every image; '' = each image's caption file")
    trigger: str = _opt("", "trigger word prepended to every caption ('' = none)")
    caption_ext: str = _opt(
        ".txt",
        "extension of the per-image caption files",
        pattern=r"^\.[^\\/\s]+$",
        pattern_msg="must start with '.', e.g. \".txt\"",
    )
    missing_caption: str = _opt(
        "error",
        "image without caption file: error, skip it, or use the trigger",
        choices=("error", "skip", "trigger"),
    )
    bad_image: str = _opt(
        "skip", "unreadable image: skip it (with a warning) or stop", choices=("skip", "error")
    )
    min_side: int = _opt(256, "images with a shorter side are skipped (or refused, see bad_image)", ge=1)
    resolutions: tuple[int, ...] = _opt(
        (1024,),
        "training resolutions (bucket areas of side^2 pixels; at least the bucket step, 64)",
        item=int,
        min_len=1,
        ge=64,
        le=4096,
        multiple_of=16,
    )
    repeats: int = _opt(1, "how many times each image appears per epoch", ge=1)
    caption_dropout: float = _opt(0.05, "probability of training a sample with an empty caption", ge=0, lt=1)
    batch_size: int = _opt(1, "samples per optimizer micro-batch", ge=1)
    drop_last: bool = _opt(False, "drop incomplete batches at the end of each bucket")
    cache_dir: str = _opt("", "latent/text cache folder; '' = <save.output_dir>/cache")
    recursive: bool = _opt(False, "also read images in sub-folders")


@dataclass(frozen=True)
class LoraConfig:
    """The trained LoRA: size, target modules and the file it is saved as."""

    rank: int = _opt(32, "LoRA rank", ge=1, le=4096)
    alpha: float = _opt(32.0, "LoRA alpha; the update is scaled by alpha / rank", gt=0)
    init: str = _opt("default", "initialisation of A (B starts at zero)", choices=("default", "gaussian"))
    targets: str = _opt(
        "aitoolkit",
        "target module preset; 'custom' uses target_regex",
        choices=("aitoolkit", "diffsynth", "attention", "custom"),
    )
    target_regex: str = _opt("", "regex on full diffusers module names (only with targets = 'custom')")
    save_dialect: str = _opt(
        "aitoolkit",
        "key layout of the saved LoRA file",
        choices=("aitoolkit", "diffusers", "diffsynth", "kohya", "comfy", "lycoris"),
    )
    save_dtype: str = _opt("bf16", "dtype of the saved LoRA file", choices=("bf16", "fp16", "fp32"))


_ADAPTER_MODES = ("adapter", "adapter_dg")


@dataclass(frozen=True)
class TurboConfig:
    """How to keep the 8-step, cfg-1 turbo behaviour of the distilled model while training a LoRA on it."""

    mode: str = _opt(
        "sft",
        "sft: plain LoRA; base: plain LoRA on Z-Image base or De-Turbo (model.family), to use on Turbo; "
        "adapter: train over a de-distilling adapter dropped at inference; "
        "adapter_dg: adapter plus differential guidance; distill: teach base + the SFT LoRA in turbo.adapter "
        "to sample in 8 steps at cfg 1 by imitating its own de-turbo trajectories",
        choices=("sft", "base", *_ADAPTER_MODES, "distill"),
    )
    adapter: str = _opt("", "training adapter LoRA file (adapter modes), or the SFT LoRA (distill)")
    adapter_strength: float = _opt(1.0, "strength the adapter (or SFT LoRA) is applied at", gt=0, le=4)
    guidance_scale: float = _opt(1.0, "differential guidance strength (adapter_dg mode only)", ge=0, le=100)
    teacher_steps: int = _opt(
        32, "distill: de-turbo steps of the teacher (a multiple of 8: its grid holds the 8 turbo sigmas)",
        ge=8, le=400, multiple_of=8,
    )
    teacher_cfg: float = _opt(2.0, "distill: CFG scale of the teacher against the empty prompt", ge=1, le=30)
    teacher_seeds: int = _opt(4, "distill: teacher trajectories (seeds) per caption", ge=1, le=1000)
    teacher_prompts: str = _opt(
        "", "distill: text file of extra teacher prompts, one per line, sampled square at the largest "
        "data.resolutions (with it, data.dataset may be empty: no images needed)",
    )
    distill_into: str = _opt(
        "new", "distill: new = train a fresh distill LoRA over the frozen SFT LoRA (saves both and the exact "
        "merge); sft = keep training the SFT LoRA itself (its rank; saves one LoRA)", choices=("new", "sft"),
    )
    rollout: int = _opt(0, "distill: student steps of the multi-step x0 term (0 = off, or 2..8)", ge=0, le=8)
    rollout_weight: float = _opt(0.0, "distill: weight of the multi-step x0 term", ge=0, le=100)

    @property
    def uses_adapter(self) -> bool:
        """Whether turbo.adapter is read: the training adapter (adapter modes) or the SFT LoRA (distill)."""
        return self.mode in (*_ADAPTER_MODES, "distill")

    @property
    def dg_scale(self) -> float:
        """The differential guidance scale the objective should use: guidance_scale in adapter_dg, else 0."""
        return self.guidance_scale if self.mode == "adapter_dg" else 0.0


@dataclass(frozen=True)
class ObjectiveConfig:
    """Timestep sampling and the loss (flow matching: x_t = (1 - s) x0 + s noise, target noise - x0)."""

    timesteps: str = _opt("shift", "timestep sampler", choices=("uniform", "shift", "logit_normal", "turbo"))
    shift: float = _opt(3.0, "sigma shift s' = k s / (1 + (k - 1) s) (timesteps = 'shift')", gt=0, le=100)
    logit_mean: float = _opt(0.0, "mean of the logit-normal sampler", ge=-10, le=10)
    logit_std: float = _opt(1.0, "std of the logit-normal sampler", gt=0, le=10)
    turbo_jitter: float = _opt(
        0.02, "sigma jitter around the 8 turbo sigmas (timesteps = 'turbo')", ge=0, le=0.5
    )
    loss: str = _opt("mse", "loss on the velocity", choices=("mse", "huber"))
    huber_delta: float = _opt(1.0, "Huber delta (loss = 'huber')", gt=0)
    weighting: str = _opt("none", "per-timestep loss weight", choices=("none", "sigma_sqr", "gaussian_bump"))


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer, learning-rate schedule, step count, clipping, EMA and the seed."""

    optimizer: str = _opt(
        "adamw",
        "optimizer (adamw8bit needs bitsandbytes, prodigy needs prodigyopt)",
        choices=("adamw", "adamw8bit", "lion", "prodigy", "adafactor"),
    )
    lr: float = _opt(
        1e-4, "peak learning rate (prodigy: a multiplier of its own estimate, use 1.0)", gt=0, le=10
    )
    weight_decay: float = _opt(0.01, "decoupled weight decay", ge=0, le=1)
    betas: tuple[float, float] = _opt(
        (0.9, 0.999),
        "Adam/Lion/Prodigy betas (Lion's paper uses [0.9, 0.99])",
        item=float,
        length=2,
        ge=0,
        lt=1,
    )
    eps: float = _opt(1e-8, "Adam/Prodigy epsilon", gt=0, le=1)
    scheduler: str = _opt(
        "constant",
        "learning-rate schedule",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "step"),
    )
    warmup_steps: int = _opt(0, "linear warmup steps (every scheduler but 'constant')", ge=0)
    restarts: int = _opt(3, "number of cosine cycles after warmup (cosine_with_restarts)", ge=1)
    step_size: int = _opt(500, "steps between lr drops (scheduler = 'step')", ge=1)
    gamma: float = _opt(0.5, "lr factor applied every step_size steps (scheduler = 'step')", gt=0, le=1)
    min_lr_ratio: float = _opt(0.0, "floor of the decaying schedules, as a fraction of lr", ge=0, le=1)
    steps: int = _opt(2000, "optimizer steps to train", ge=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", ge=1)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)", ge=0)
    ema: bool = _opt(False, "keep an EMA of the LoRA weights and save/preview it")
    ema_decay: float = _opt(0.999, "EMA decay (with warm-up min(decay, (1+step)/(10+step)))", gt=0, lt=1)
    seed: int = _opt(42, "seed of every random stream of the run", ge=0, lt=2**63)


@dataclass(frozen=True)
class SaveConfig:
    """Where and how often LoRA files and resumable training states are written."""

    output_dir: str = _opt("output", "folder holding one sub-folder per run name")
    name: str = _opt(
        "zit_lora",
        "run name: sub-folder and file prefix",
        pattern=_NAME_RE,
        pattern_msg="must be a file name (no path separators, not starting with '.')",
    )
    every: int = _opt(250, "save a LoRA every N steps (0 = only at the end)", ge=0)
    keep_last: int = _opt(3, "keep the N newest step checkpoints (0 = keep all)", ge=0)
    state: bool = _opt(True, "also save the training state so the run can resume")


@dataclass(frozen=True)
class PreviewConfig:
    """Preview images sampled during training."""

    every: int = _opt(250, "sample previews every N steps (0 disables)", ge=0)
    prompts: tuple[str, ...] = _opt((), "preview prompts (needed when every > 0)", item=str)
    seed: int = _opt(42, "seed of the preview noise", ge=0, lt=2**63)
    width: int = _opt(1024, "preview width", ge=16, le=4096, multiple_of=16)
    height: int = _opt(1024, "preview height", ge=16, le=4096, multiple_of=16)
    deturbo: bool = _opt(False, "sample de-turbo (deturbo_steps, deturbo_cfg) instead of 8 steps at cfg 1")
    turbo_steps: int = _opt(8, "sampling steps of turbo previews", ge=1, le=200)
    deturbo_steps: int = _opt(30, "sampling steps of de-turbo previews", ge=1, le=200)
    deturbo_cfg: float = _opt(2.0, "CFG scale of de-turbo previews", ge=1, le=30)
    health_every: int = _opt(
        100, "turbo health (8-step x0 drift vs the untouched base, adapter off) every N steps; 0 = off",
        ge=0,
    )
    health_size: int = _opt(256, "image side of the turbo-health samples", ge=16, le=2048, multiple_of=16)
    turbo_model: str = _opt(
        "", "turbo.mode = base: a Z-Image-Turbo transformer (single file or diffusers folder) to also "
        "preview the LoRA on at 8 steps, cfg 1 (skipped with a message when it does not fit in memory)",
    )


@dataclass(frozen=True)
class LogConfig:
    """What a run reports besides its console lines and loss.png."""

    tensorboard: bool = _opt(
        False, "also log loss, smoothed loss, lr, it/s, GPU memory, turbo health and the previews for "
        "TensorBoard in <save.output_dir>/<save.name>/tensorboard (command line; needs `pip install "
        "tensorboard`)",
    )


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    turbo: TurboConfig = field(default_factory=TurboConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_dir(self) -> Path:
        """The run's folder: <save.output_dir>/<save.name>."""
        return Path(self.save.output_dir) / self.save.name

    @property
    def cache_path(self) -> Path:
        """The cache folder: data.cache_dir, or <save.output_dir>/cache when empty."""
        return Path(self.data.cache_dir) if self.data.cache_dir else Path(self.save.output_dir) / "cache"


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FieldSpec:
    """One config field: its place, kind, default, doc and rules (the node can build widgets from these)."""

    section: str
    key: str
    kind: type  # bool, int, float, str or tuple
    default: Any
    doc: str
    item: type | None = None  # element kind of tuple fields
    length: int | None = None  # exact tuple length
    min_len: int = 0
    choices: tuple[str, ...] = ()
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    pattern: str | None = None
    pattern_msg: str = ""

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"


def _spec(section: str, f: dataclasses.Field) -> FieldSpec:
    kind = tuple if isinstance(f.default, tuple) else type(f.default)
    return FieldSpec(section=section, key=f.name, kind=kind, default=f.default, **f.metadata)


FIELDS: dict[str, FieldSpec] = {
    s.dotted: s for name, cls in SECTIONS.items() for s in (_spec(name, f) for f in dataclasses.fields(cls))
}


def _show(value: Any) -> str:
    """A value as it would be written in TOML (for error messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a JSON string is a TOML basic string once DEL is escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return repr(value)


def _num(x: float) -> str:
    return f"{x:g}"

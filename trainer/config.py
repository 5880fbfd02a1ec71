"""The one validated training config, shared by the CLI (TOML file), the ComfyUI node and the LoRA metadata.

Every field is declared once, below, with its default (Z-Image-Turbo's), a one-line doc and its rules
(choices, bounds, multiple-of, pattern). Validation is driven by that table (`FIELDS`) plus a short list of
cross-field rules; every error names the dotted field and the value, e.g. `optim.lr = -1: must be > 0`.

Decisions worth knowing:
- Paths are kept as written (relative paths are relative to the working directory) and are not checked
  for existence here: the loader that opens them reports a missing file, naming the field.
- `model.transformer` and `data.dataset` are required; `TrainConfig()` itself is only the table of
  defaults, `config_from_dict` is what validates.
- Options that only one mode reads are errors when set (away from their default) in another mode, so no
  option silently does nothing: `turbo.adapter`, `turbo.adapter_strength` (adapter modes),
  `turbo.guidance_scale` (`adapter_dg` only), `lora.target_regex` (`custom` targets only). Tuning knobs of a
  choice (`objective.shift`, `optim.restarts`, `optim.ema_decay`, ...) are ignored when their choice is
  not selected, as their docs say.
- `turbo.guidance_scale` is the differential-guidance strength handed to the objective in `adapter_dg`
  mode (default 1.0; 0 would be plain `adapter` mode and is refused there). `TurboConfig.dg_scale` is the
  one value the objective should read: the scale in `adapter_dg` mode, 0.0 otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ZitError):
    """An invalid training config; `errors` lists every problem, each naming its dotted field."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        if len(errors) == 1:
            text = f"{source}: {errors[0]}"
        else:
            text = f"{source}: {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)
        super().__init__(text)


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
    dtype: str = _opt(
        "bf16",
        "compute dtype of the frozen base (LoRA weights are always fp32)",
        choices=("bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = _opt(True, "recompute activations in backward to save memory")
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
        "training resolutions (bucket areas of side^2 pixels)",
        item=int,
        min_len=1,
        ge=16,
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
        "sft: plain LoRA; adapter: train over a de-distilling adapter dropped at inference; "
        "adapter_dg: adapter plus differential guidance; distill: teach base + the SFT LoRA in turbo.adapter "
        "to sample in 8 steps at cfg 1 by imitating its own de-turbo trajectories",
        choices=("sft", *_ADAPTER_MODES, "distill"),
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
    rollout: int = _opt(0, "distill: student steps of the multi-step x0 term (0 = off, or 2..8)", ge=0, le=8)
    rollout_weight: float = _opt(0.0, "distill: weight of the multi-step x0 term", ge=0, le=100)

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


# ---------------------------------------------------------------------------------------------- values


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


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _coerce_scalar(kind: type, value: Any) -> tuple[Any, str | None]:
    """Value converted to kind (int -> float allowed), or an error; bools are never numbers."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        return None, f"must be {_KIND_NAMES[kind]}"
    if kind is float and not math.isfinite(value):
        return None, "must be finite"
    return value, None


_BOUNDS: tuple[tuple[str, Callable[[float, float], bool], str], ...] = (
    ("gt", lambda v, b: v > b, ">"),
    ("ge", lambda v, b: v >= b, ">="),
    ("lt", lambda v, b: v < b, "<"),
    ("le", lambda v, b: v <= b, "<="),
)


def _rule_error(spec: FieldSpec, value: Any) -> str | None:
    """The first rule of spec that a scalar value breaks, as 'must ...', or None."""
    if spec.choices and value not in spec.choices:
        close = difflib.get_close_matches(value, spec.choices, n=1, cutoff=0.6)
        return (
            "must be one of "
            + ", ".join(_show(c) for c in spec.choices)
            + _hint(_show(close[0]) if close else None)
        )
    for attr, holds, sign in _BOUNDS:
        bound = getattr(spec, attr)
        if bound is not None and not holds(value, bound):
            return f"must be {sign} {_num(bound)}"
    if spec.multiple_of and value % spec.multiple_of:
        return f"must be a multiple of {spec.multiple_of}"
    if spec.pattern and not re.match(spec.pattern, value):
        return spec.pattern_msg
    return None


def _check_tuple(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, (list, tuple)):
        return None, f"must be a list of {_PLURALS[spec.item]}"
    if spec.length is not None and len(value) != spec.length:
        return None, f"must have exactly {spec.length} items"
    if len(value) < spec.min_len:
        return None, f"must have at least {spec.min_len} item" + ("s" if spec.min_len > 1 else "")
    items = []
    for v in value:
        item, err = _coerce_scalar(spec.item, v)
        err = err or _rule_error(spec, item)
        if err:
            return None, f"item {_show(v)} {err}"
        items.append(item)
    return tuple(items), None


def _field_error(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    """The value converted to the field's kind, or an error 'field = value: must ...'."""
    if spec.kind is tuple:
        out, err = _check_tuple(spec, value)
    else:
        out, err = _coerce_scalar(spec.kind, value)
        err = err or _rule_error(spec, out)
    return out, (f"{spec.dotted} = {_show(value)}: {err}" if err else None)


def check_field(dotted: str, value: Any) -> Any:
    """The value converted to the field's kind; raises ConfigError naming the field and value if invalid."""
    spec = FIELDS.get(dotted)
    if spec is None:
        section, _, key = dotted.rpartition(".")
        raise ConfigError("config", [f"unknown key {dotted}{_suggest_key(key, section or None)}"])
    out, err = _field_error(spec, value)
    if err:
        raise ConfigError("config", [err])
    return out


# ---------------------------------------------------------------------------------------------- cross rules


def _modal(cfg: TrainConfig, dotted: str, used: bool, when: str) -> str | None:
    """Error if a field only read in another mode was set away from its default."""
    section, key = dotted.split(".")
    value = getattr(getattr(cfg, section), key)
    if used or value == FIELDS[dotted].default:
        return None
    return f"{dotted} = {_show(value)}: only used when {when}; remove it"


def _required(cfg: TrainConfig, dotted: str, why: str = "") -> str | None:
    section, key = dotted.split(".")
    return None if getattr(getattr(cfg, section), key) else f"{dotted} is required{why}"


def _rule_required(cfg: TrainConfig) -> list[str | None]:
    adapter_mode = cfg.turbo.mode in _ADAPTER_MODES
    single = cfg.model.transformer.lower().endswith((".safetensors", ".sft"))
    why = ": a single-file transformer has no folder to take it from"
    return [
        _required(cfg, "model.transformer"),
        _required(cfg, "data.dataset"),
        _required(cfg, "model.text_encoder", why) if single else None,
        _required(cfg, "model.vae", why) if single else None,
        _required(cfg, "turbo.adapter", f" when turbo.mode = {_show(cfg.turbo.mode)}")
        if adapter_mode or cfg.turbo.mode == "distill"
        else None,
        _required(cfg, "lora.target_regex", ' when lora.targets = "custom"')
        if cfg.lora.targets == "custom"
        else None,
        _required(cfg, "data.trigger", ' when data.missing_caption = "trigger"')
        if cfg.data.missing_caption == "trigger"
        else None,
    ]


def _rule_modal(cfg: TrainConfig) -> list[str | None]:
    adapter_mode = cfg.turbo.mode in _ADAPTER_MODES
    auto = cfg.model.memory == "auto"
    distill = cfg.turbo.mode == "distill"
    swap = auto or cfg.model.memory.endswith("_swap")
    return [
        _modal(cfg, "turbo.adapter", adapter_mode or distill,
               'turbo.mode is "adapter", "adapter_dg" or "distill"'),
        _modal(cfg, "turbo.adapter_strength", adapter_mode or distill,
               'turbo.mode is "adapter", "adapter_dg" or "distill"'),
        *(_modal(cfg, f"turbo.{key}", distill, 'turbo.mode = "distill"')
          for key in ("teacher_steps", "teacher_cfg", "teacher_seeds", "rollout", "rollout_weight")),
        _modal(cfg, "turbo.guidance_scale", cfg.turbo.mode == "adapter_dg", 'turbo.mode = "adapter_dg"'),
        _modal(cfg, "lora.target_regex", cfg.lora.targets == "custom", 'lora.targets = "custom"'),
        _modal(cfg, "model.swap_blocks", swap, 'model.memory is "auto", "bf16_swap" or "fp8_swap"'),
        _modal(cfg, "model.swap_prefetch", swap, 'model.memory is "auto", "bf16_swap" or "fp8_swap"'),
        _modal(cfg, "model.memory_preference", auto, 'model.memory = "auto"'),
        _modal(cfg, "model.lower_resolution", auto, 'model.memory = "auto"'),
    ]


def _rule_regex(cfg: TrainConfig) -> list[str | None]:
    if not cfg.lora.target_regex:
        return []
    try:
        re.compile(cfg.lora.target_regex)
    except re.error as exc:
        return [f"lora.target_regex = {_show(cfg.lora.target_regex)}: not a valid regex ({exc})"]
    return []


def _rule_schedule(cfg: TrainConfig) -> list[str | None]:
    o = cfg.optim
    errors: list[str | None] = []
    if o.scheduler == "constant" and o.warmup_steps:
        errors.append(
            f'optim.warmup_steps = {o.warmup_steps}: the "constant" scheduler has no warmup; '
            'use "constant_with_warmup"'
        )
    elif o.warmup_steps >= o.steps:
        errors.append(f"optim.warmup_steps = {o.warmup_steps}: must be < optim.steps ({o.steps})")
    elif o.scheduler == "cosine_with_restarts" and o.restarts > o.steps - o.warmup_steps:
        errors.append(
            f"optim.restarts = {o.restarts}: more cycles than steps after warmup ({o.steps - o.warmup_steps})"
        )
    if o.optimizer == "prodigy" and o.lr < 0.1:
        errors.append(
            f"optim.lr = {_show(o.lr)}: Prodigy estimates the step size itself and lr multiplies "
            "that estimate; use about 1.0"
        )
    return errors


def _rule_misc(cfg: TrainConfig) -> list[str | None]:
    errors: list[str | None] = []
    if cfg.turbo.rollout == 1:
        errors.append("turbo.rollout = 1: one student step is the velocity term itself; use 0 or 2..8")
    if cfg.turbo.rollout and not cfg.turbo.rollout_weight:
        errors.append(f"turbo.rollout = {cfg.turbo.rollout}: set turbo.rollout_weight > 0 to use it")
    if cfg.turbo.mode == "adapter_dg" and cfg.turbo.guidance_scale == 0:
        errors.append('turbo.guidance_scale = 0.0: no guidance; use turbo.mode = "adapter"')
    if cfg.model.memory.endswith("_swap") and not cfg.model.gradient_checkpointing:
        errors.append(
            f"model.memory = {_show(cfg.model.memory)}: block swap recomputes blocks in backward; "
            "set model.gradient_checkpointing = true"
        )
    if cfg.preview.every and not cfg.preview.prompts:
        errors.append(
            f"preview.prompts is empty but preview.every = {cfg.preview.every}: "
            "give at least one prompt or set preview.every = 0"
        )
    return errors


_CROSS_RULES: tuple[Callable[[TrainConfig], list[str | None]], ...] = (
    _rule_required,
    _rule_modal,
    _rule_regex,
    _rule_schedule,
    _rule_misc,
)


def validate_config(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Check every field and cross-field rule of cfg; returns cfg or raises one ConfigError listing all."""
    errors = [
        err
        for spec in FIELDS.values()
        if (err := _field_error(spec, getattr(getattr(cfg, spec.section), spec.key))[1])
    ]
    if not errors:
        errors = [e for rule in _CROSS_RULES for e in rule(cfg) if e]
    if errors:
        raise ConfigError(source, errors)
    return cfg


# ---------------------------------------------------------------------------------------------- dict / TOML


def _hint(name: str | None) -> str:
    return f" (did you mean {name}?)" if name else ""


def _suggest_section(name: str) -> str:
    """' (did you mean [optim]?)' for a misspelt section name, or ''."""
    close = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.6)
    return _hint(f"[{close[0]}]" if close else None)


def _suggest_key(key: str, section: str | None) -> str:
    """' (did you mean data.caption?)' for a key in the wrong section (or at top level), or a misspelt one."""
    exact = next((s.dotted for s in FIELDS.values() if s.key == key), None)
    if exact:
        return _hint(exact)
    same = [s.key for s in FIELDS.values() if s.section == section]
    close = difflib.get_close_matches(key, same, n=1, cutoff=0.6)
    if close:
        return _hint(f"{section}.{close[0]}")
    by_key = {s.key: s.dotted for s in FIELDS.values()}
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.8)
    return _hint(by_key[close[0]] if close else None)


def _parse_section(name: str, values: Any, errors: list[str]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        errors.append(f"{name} = {_show(values)}: must be a table [{name}]")
        return cls()
    kwargs = {}
    for key, value in values.items():
        spec = FIELDS.get(f"{name}.{key}")
        if spec is None:
            errors.append(f"unknown key {name}.{key}{_suggest_key(key, name)}")
            continue
        kwargs[key], err = _field_error(spec, value)
        if err:
            errors.append(err)
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from nested {section: {key: value}}; raises ConfigError."""
    errors: list[str] = []
    for key in d:
        if key in SECTIONS:
            continue
        if isinstance(d[key], dict):
            errors.append(f"unknown section [{key}]{_suggest_section(key)}")
        else:
            errors.append(f"unknown top-level key {key}{_suggest_key(key, None)}")
    sections = {name: _parse_section(name, d.get(name, {}), errors) for name in SECTIONS}
    if errors:
        raise ConfigError(source, errors)
    return validate_config(TrainConfig(**sections), source)


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (lists for tuples): TOML- and JSON-ready."""
    return {
        name: {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        for name, section in ((n, getattr(cfg, n)) for n in SECTIONS)
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    """One TOML value (scalar or flat array); floats keep their exact repr."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a TOML config")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _show(value)


def config_to_toml(cfg: TrainConfig, comments: bool = True) -> str:
    """The config as TOML text (with each field's doc as a comment unless comments=False)."""
    lines: list[str] = []
    for name, values in config_to_dict(cfg).items():
        if lines:
            lines.append("")
        if comments:
            lines.append(f"# {SECTIONS[name].__doc__}")
        lines.append(f"[{name}]")
        for key, value in values.items():
            if comments:
                lines.append(f"# {FIELDS[f'{name}.{key}'].doc}")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training config file."""
    path = Path(path)
    return config_from_dict(_parse_toml(path.read_text(encoding="utf-8"), str(path)), source=str(path))


def apply_overrides(cfg: TrainConfig, toml_text: str, source: str = "advanced settings") -> TrainConfig:
    """cfg with the keys given in toml_text (e.g. the node's advanced-settings box) replaced, validated."""
    overrides = _parse_toml(toml_text, source)
    if not overrides:
        return cfg
    merged: dict[str, Any] = config_to_dict(cfg)
    for key, value in overrides.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return config_from_dict(merged, source=source)


def config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Lines 'section.key: old -> new' for every field that differs (e.g. to report on resume)."""
    return [f"{s.dotted}: {_show(a)} -> {_show(b)}" for s, a, b in _field_pairs(old, new) if a != b]


def _field_pairs(a: TrainConfig, b: TrainConfig) -> Iterator[tuple[FieldSpec, Any, Any]]:
    for spec in FIELDS.values():
        yield spec, getattr(getattr(a, spec.section), spec.key), getattr(getattr(b, spec.section), spec.key)

"""Cross-field rules of the training config: what one field's value means for another (required, only used
in a mode, consistent). Each rule returns error lines naming the dotted fields; `validate_config` runs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .config_fields import _ADAPTER_MODES, FIELDS, TrainConfig, _show


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
    adapter_mode, distill = cfg.turbo.mode in _ADAPTER_MODES, cfg.turbo.mode == "distill"
    single = cfg.model.transformer.lower().endswith((".safetensors", ".sft"))
    why = ": a single-file transformer has no folder to take it from"
    return [
        _required(cfg, "model.transformer"),
        None if distill and cfg.turbo.teacher_prompts
        else _required(cfg, "data.dataset", " (or turbo.teacher_prompts)" if distill else ""),
        _required(cfg, "model.text_encoder", why) if single else None,
        _required(cfg, "model.vae", why) if single else None,
        _required(cfg, "turbo.adapter", f" when turbo.mode = {_show(cfg.turbo.mode)}")
        if adapter_mode or distill
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
          for key in ("teacher_steps", "teacher_cfg", "teacher_seeds", "teacher_prompts", "distill_into",
                      "rollout", "rollout_weight")),
        _modal(cfg, "turbo.guidance_scale", cfg.turbo.mode == "adapter_dg", 'turbo.mode = "adapter_dg"'),
        _modal(cfg, "preview.turbo_model", cfg.turbo.mode == "base", 'turbo.mode = "base"'),
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
    family, mode = cfg.model.family, cfg.turbo.mode
    if mode == "base" and family == "turbo":
        errors.append('turbo.mode = "base" trains on Z-Image base or De-Turbo, but model.family = "turbo": '
                      'set model.family = "base" or "deturbo", or use turbo.mode = "sft"')
    elif family in ("base", "deturbo") and mode != "base":
        errors.append(f'model.family = "{family}" with turbo.mode = "{mode}": the {family} model is not '
                      'distilled; train it with turbo.mode = "base"')
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

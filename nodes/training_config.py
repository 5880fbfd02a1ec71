"""ZIT Train's config: the choices its widgets offer, the keys it owns, the advanced TOML and the TrainConfig.

Kept apart from the node class (nodes/training.py) so the rules of what the node sets, and what the advanced
settings may add, read in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dataset import ZitDataset
from .training_job import runs_root

NONE = "none"
# Kept in step with trainer.config's choices (a host test checks), so importing the pack stays light.
TURBO = ("adapter", "adapter_dg", "sft", "distill", "base")
USES_ADAPTER = ("adapter", "adapter_dg", "distill")
FAMILY = ("auto", "turbo", "base", "deturbo")
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "prodigy", "adafactor")
MEMORY = ("auto", "bf16", "fp8", "bf16_swap", "fp8_swap", "nf4", "int8")
DEFAULT_DEVICE = "default"

SET_BY_DATASET = "the ZIT Dataset node"
OWNED = {  # config keys the node sets from its inputs; advanced may not set them
    "log.tensorboard": "the command line only (in ComfyUI the ZIT panel charts the run)",
    "model.transformer": "the model input (its file)",
    "model.text_encoder": "the dataset's text encoder",
    "model.vae": "the dataset's VAE",
    "model.gradient_checkpointing": "the gradient_checkpointing input",
    "model.memory": "the memory input",
    "model.family": "the family input",
    "model.device": "the device input",
    **{f"data.{key}": SET_BY_DATASET for key in ("dataset", "caption", "trigger", "caption_ext",
                                                 "missing_caption", "bad_image", "min_side", "resolutions",
                                                 "recursive", "cache_dir")},
    "data.batch_size": "the batch_size input",
    "lora.rank": "the rank input",
    "turbo.mode": "the turbo input",
    "turbo.adapter": "the adapter input",
    "optim.optimizer": "the optimizer input",
    "optim.lr": "the learning_rate input",
    "optim.steps": "the steps input",
    "optim.seed": "the seed input",
    "save.output_dir": "the node (runs live in <output>/zit-trainer/runs)",
    "save.name": "the name input",
    "save.every": "the save_every input",
    "preview.prompts": "the preview_prompts input",
    "preview.every": "the preview_every input",
}


def parse_advanced(text: str) -> dict[str, dict[str, Any]]:
    """The advanced TOML as {section: {key: value}}; ConfigError listing every bad, unknown or owned key."""
    from ..trainer.config import ConfigError, check_field, tomllib

    source = "advanced settings"
    try:
        raw = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    errors: list[str] = []
    for section, values in raw.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in items:
            dotted = section if key is None else f"{section}.{key}"
            if dotted in OWNED:
                errors.append(f"{dotted} is set by {OWNED[dotted]}; remove it from the advanced settings")
                continue
            try:
                check_field(dotted, value)
            except ConfigError as exc:
                errors.extend(exc.errors)
    if errors:
        raise ConfigError(source, errors)
    return raw


@dataclass(frozen=True)
class Settings:
    """The node's widgets that go into the config."""

    name: str
    turbo: str
    adapter: str | None  # file path
    steps: int
    learning_rate: float
    rank: int
    optimizer: str
    batch_size: int
    gradient_checkpointing: bool
    memory: str
    family: str
    device: str
    save_every: int
    preview_prompts: tuple[str, ...]
    preview_every: int
    seed: int
    advanced: str


def build_config(s: Settings, transformer: str, data: ZitDataset) -> Any:
    """The validated TrainConfig of the node's inputs, the dataset's settings and the advanced TOML."""
    from ..trainer.config import config_from_dict

    overrides = parse_advanced(s.advanced)
    base: dict[str, dict[str, Any]] = {
        "model": {"transformer": transformer, "text_encoder": data.te_file or f"<ComfyUI CLIP {data.te_id}>",
                  "vae": data.vae_file or f"<ComfyUI VAE {data.vae_id}>",
                  "gradient_checkpointing": s.gradient_checkpointing, "memory": s.memory,
                  "family": s.family, "device": "" if s.device == DEFAULT_DEVICE else s.device},
        "data": {**data.data, "batch_size": s.batch_size},
        "lora": {"rank": s.rank, "alpha": float(s.rank)},
        "turbo": {"mode": s.turbo, **({"adapter": s.adapter or ""} if s.turbo in USES_ADAPTER else {})},
        "optim": {"optimizer": s.optimizer, "lr": s.learning_rate, "steps": s.steps, "seed": s.seed},
        "save": {"output_dir": str(runs_root()), "name": s.name, "every": s.save_every},
        "preview": {"every": s.preview_every if s.preview_prompts else 0, "prompts": list(s.preview_prompts)},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base, source="ZIT Train")


def prompt_lines(text: str) -> tuple[str, ...]:
    """The non-empty lines of a multiline prompt widget, stripped."""
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())

"""The models a training run owns: its memory plan, its private transformer and its lazy encoders.

The plan is chosen from the config and the checkpoint's header before any weight is loaded (`plan_memory`);
the transformer is then loaded in the plan's storage (bf16, fp8, nf4, int8) with the main blocks' weights
left in CPU memory when the plan swaps blocks (`open_models`); `BlockSwap` is installed by the Trainer once
the LoRA sits on the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import Dataset, LazyEncoder, load_dataset
from .errors import ZitError
from .lora.spec import ZitSpec
from .memory import (
    MemoryEstimate,
    MemoryPlan,
    choose_plan,
    free_vram,
    parse_vram,
    transformer_spec,
)
from .memory_report import format_plan_table
from .model import load_text_encoder, load_transformer, load_vae
from .model.quantize import quantize_transformer
from .model.text_encoder import COMFYUI_TOKENIZER, comfyui_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

log = logging.getLogger(__name__)


class TrainingError(ZitError):
    """Training cannot go on (NaN loss, a missing model part); the last checkpoint stays usable."""


def file_identity(path: str | Path) -> str:
    """A cheap content identity of a weights file or folder: header, size and a 1 MiB sample per file."""
    path = Path(path)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(size // 2)
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def pick_device(name: str = "") -> torch.device:
    """model.device: '' = CUDA when there is one, else CPU; "cpu", "cuda" or "cuda:N" as given, checked."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise TrainingError(f"model.device = {name!r}: this machine has {count} CUDA device(s)")
    return device


@dataclass
class Models:
    """The transformer the job owns, lazy encoders for the cache, and their identities."""

    transformer: torch.nn.Module
    encode_image: LazyEncoder
    encode_text: LazyEncoder
    base_id: str
    vae_id: str
    te_id: str
    vae_factory: Any


COMFYUI_ENV = "COMFYUI_PATH"
"""A ComfyUI checkout whose Qwen tokenizer serves a single-file text encoder (the CLI's --comfyui sets it)."""


def comfyui_checkout(env: Mapping[str, str] | None = None) -> Path | None:
    """COMFYUI_PATH when set, else the ComfyUI this package sits in as a custom node (when it has the Qwen
    tokenizer), else None."""
    env = os.environ if env is None else env
    if env.get(COMFYUI_ENV):
        return Path(env[COMFYUI_ENV])
    pack = Path(__file__).absolute().parent.parent  # <ComfyUI>/custom_nodes/<pack>/trainer/run_models.py
    home = pack.parent.parent
    return home if pack.parent.name == "custom_nodes" and home.joinpath(*COMFYUI_TOKENIZER).is_dir() else None


def text_encoder_source(cfg: TrainConfig, comfyui: Path | None = None) -> tuple[Path, Path | None]:
    """The text encoder's path and, for a single file, its tokenizer folder: a `tokenizer` folder beside the
    file, else the Qwen tokenizer of the ComfyUI checkout `comfyui` (refused in one line when it has none),
    else None (loading it then asks for one). A diffusers folder brings its own (None)."""
    path = Path(cfg.model.text_encoder or cfg.model.transformer)
    if not path.is_file():
        return path, None
    beside = path.parent / "tokenizer"
    if beside.is_dir():
        return path, beside
    if comfyui is None:
        return path, None
    tokenizer = comfyui_tokenizer(comfyui)
    log.info("text encoder %s: tokenizer from the ComfyUI checkout, %s", path.name, tokenizer)
    return path, tokenizer


OpenModels = Callable[[TrainConfig, torch.device, MemoryPlan], Models]
"""Builds a run's Models from its config on a device in a memory plan: `open_models`, or a front end's
`cache_only_models`."""


def _open_transformer(cfg: TrainConfig, device: torch.device,
                      plan: MemoryPlan) -> tuple[torch.nn.Module, str]:
    """The job's private transformer in the plan's storage, and its identity ('tiny' = the seeded tiny model,
    float32 then cast). With block swap the main blocks' frozen weights stay in CPU memory."""
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.transformer == "tiny":
        from .tiny import tiny_transformer

        model = tiny_transformer(0).to(device)
        model = model.to(dtype) if dtype != torch.float32 else model
        quantize_transformer(model, plan.storage, dtype)
        return model, "tiny-0"
    block_device = "cpu" if plan.swap_blocks else None
    model = load_transformer(cfg.model.transformer, dtype, device, storage=plan.storage,
                             block_device=block_device)
    return model, file_identity(cfg.model.transformer)


def open_models(cfg: TrainConfig, device: torch.device, plan: MemoryPlan) -> Models:
    """Load the job's private transformer now; the text encoder and VAE only when the cache needs them."""
    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.transformer == "tiny":
        from .tiny import tiny_text_encoder, tiny_vae

        te_factory = lambda: _to(tiny_text_encoder(0), device)  # noqa: E731
        vae_factory = lambda: _to(tiny_vae(0), device)  # noqa: E731
        ids = ("tiny-vae-0", "tiny-te-0")
    else:
        te_path, tokenizer = text_encoder_source(cfg, comfyui_checkout())  # a bad checkout: refused first
        vae_path = Path(cfg.model.vae or cfg.model.transformer)
        te_factory = lambda: load_text_encoder(te_path, dtype, device, tokenizer=tokenizer)  # noqa: E731
        vae_factory = lambda: load_vae(vae_path, dtype, device)  # noqa: E731
        ids = (file_identity(vae_path), file_identity(te_path))
    model, base_id = _open_transformer(cfg, device, plan)
    return Models(model, LazyEncoder(lambda: _vae_encoder(vae_factory())),
                  LazyEncoder(lambda: te_factory().encode), base_id, *ids, vae_factory)


def cache_only_models(cfg: TrainConfig, device: torch.device, plan: MemoryPlan, *, vae_id: str, te_id: str,
                      vae: str | None, hint: str) -> Models:
    """The job's transformer with encoders that refuse to run, for a front end that wrote every latent and
    text embedding (captions, the empty caption, preview prompts) to the cache itself under `vae_id` and
    `te_id` (the ComfyUI node, with the graph's own VAE and text encoder).

    A cache miss is a TrainingError ending in `hint`. Previews decode with the VAE file `vae` ('tiny' = the
    tiny VAE), loaded by the job itself; None refuses previews.
    """
    dtype = DTYPES[cfg.model.dtype]
    model, base_id = _open_transformer(cfg, device, plan)

    def refuse(what: str) -> Callable[[], Any]:
        def build() -> Any:
            raise TrainingError(f"the cache {cfg.cache_path} has no {what} for these encoders; {hint}")
        return build

    def vae_factory() -> Any:
        if vae is None:
            raise TrainingError(f"previews need the VAE as a file the job can load; {hint}")
        if vae == "tiny":
            from .tiny import tiny_vae

            return _to(tiny_vae(0), device)
        return load_vae(vae, dtype, device)

    return Models(model, LazyEncoder(refuse("image latent")), LazyEncoder(refuse("text embedding")), base_id,
                  vae_id, te_id, vae_factory)


def _to(wrapper, device: torch.device):
    """Move a TextEncoder / Vae wrapper's model to the device."""
    wrapper.model.to(device)
    return wrapper


def _vae_encoder(vae):
    return lambda pixels: vae.encode(pixels.to(next(vae.model.parameters()).device, vae.model.dtype))


@dataclass(frozen=True)
class PlannedMemory:
    """The plan a run executes, the estimates it was chosen from, and the budget it had."""

    plan: MemoryPlan
    estimates: list[MemoryEstimate]
    budget: int | None

    @property
    def chosen(self) -> MemoryEstimate:
        return next(e for e in self.estimates if e.plan == self.plan)

    def table(self) -> str:
        return format_plan_table(self.estimates, self.plan)

    def event(self) -> dict[str, Any]:
        """The job event announcing the plan (ComfyUI's log, the ZIT panel, the node's VRAM reserve)."""
        chosen = self.chosen
        return {"plan": self.plan.name, "storage": self.plan.storage, "swap_blocks": self.plan.swap_blocks,
                "resolution": self.plan.resolution, "predicted_gb": chosen.total / 2**30,
                "working_bytes": chosen.working, "budget_gb": self.budget / 2**30 if self.budget else None,
                "relative_time": chosen.relative_time}


def plan_memory(cfg: TrainConfig, device: torch.device, spec: ZitSpec | None = None) -> PlannedMemory:
    """Choose the run's memory plan for the budget (model.vram, else the device's free memory) from the
    config and headers alone; refuses before anything loads when nothing fits or a package is missing."""
    budget = parse_vram(cfg.model.vram) if cfg.model.vram else free_vram(device)
    plan, estimates = choose_plan(cfg, spec or transformer_spec(cfg), budget)
    if plan.storage in ("nf4", "int8") and importlib.util.find_spec("bitsandbytes") is None:
        raise ZitError(f'model.memory = "{plan.storage}" needs bitsandbytes: pip install bitsandbytes')
    return PlannedMemory(plan, estimates, budget)


def config_for_plan(cfg: TrainConfig, plan: MemoryPlan) -> TrainConfig:
    """The config with data.resolutions capped at the plan's resolution (when the planner had to lower it)."""
    kept = tuple(r for r in cfg.data.resolutions if r <= plan.resolution)
    if kept == cfg.data.resolutions:
        return cfg
    data = dataclasses.replace(cfg.data, resolutions=kept or (plan.resolution,))
    return dataclasses.replace(cfg, data=data)




def scan_dataset(d: Any, log: Callable[[str], None]) -> Dataset | None:
    """Scan cfg.data's image folder with its settings, logging each skipped file; None without a folder
    (distill from a prompt list alone)."""
    if not d.dataset:
        return None
    dataset = load_dataset(d.dataset, d.resolutions, recursive=d.recursive, caption=d.caption or None,
                           trigger=d.trigger or None, missing_caption=d.missing_caption,
                           bad_image=d.bad_image, min_side=d.min_side, caption_ext=d.caption_ext)
    for issue in dataset.issues:
        log(f"dataset: skipped {issue.path.name}: {issue.problem}")
    return dataset


def plan_run_memory(cfg: TrainConfig, device: torch.device, dataset: Dataset | None,
                    emit: Callable[..., None]) -> MemoryPlan:
    """`plan_memory` for a run: refuses a plan below the resolution an already encoded dataset has, sends
    the "plan" event and a log line (the CLI's log also gets the table)."""
    planned = plan_memory(cfg, device)
    plan = planned.plan
    if dataset is not None and plan.resolution < max(cfg.data.resolutions):
        top = max(cfg.data.resolutions)
        raise TrainingError(f"the memory plan {plan.name} trains at {plan.resolution} px, but the dataset "
                            f"was encoded at {top} px: encode it at {plan.resolution} or choose model.memory")
    emit("plan", **planned.event())
    budget = f" of {planned.budget / 2**30:.1f} GiB" if planned.budget else ""
    peak = planned.chosen.total / 2**30
    emit("log", message=f"memory plan: {plan.name}, predicted peak {peak:.1f} GiB{budget}")
    log.info("%s", planned.table())
    return plan

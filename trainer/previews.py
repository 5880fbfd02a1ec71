"""Preview rows of a run, and (turbo.mode = "base") the LoRA previewed where it will be used: on
Z-Image-Turbo at 8 steps, cfg 1.

The Turbo transformer (`preview.turbo_model`) is checked from its header when the run starts (same sizes as
the training model, not a base or De-Turbo file), then loaded for each preview beside the training model,
given the LoRA as it stands, sampled and dropped again. On a GPU it is loaded only when its weights fit in
the free memory with a margin; otherwise that row is skipped with a message and training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .lora.canonical import Lora
from .lora.spec import ZitSpec
from .model import checkpoint_spec, load_lora_into_peft, load_transformer
from .model.family import NAMES, detect_family
from .model.headers import ModelLoadError
from .model.transformer import transformer_checkpoint
from .sampling import SamplerSettings, preview_rows

MARGIN_BYTES = 2 * 2**30
"""Free GPU memory the Turbo preview leaves for sampling (activations at preview size, the VAE decode)."""


def check_turbo_model(path: str, spec: ZitSpec) -> None:
    """Refuse, from headers only, a preview.turbo_model that is not a Z-Image-Turbo of the training sizes."""
    try:
        found = checkpoint_spec(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"preview.turbo_model = {path!r}: {e}") from None
    if found != spec:
        raise ModelLoadError(f"preview.turbo_model = {path!r}: its transformer sizes ({found.dim} wide, "
                             f"{found.n_layers} layers) differ from the training model's ({spec.dim}, "
                             f"{spec.n_layers}); it must be Z-Image-Turbo")
    family = detect_family(path)
    if family and family[0] != "turbo":
        raise ModelLoadError(f"preview.turbo_model = {path!r} is {NAMES[family[0]]} ({family[1]}), not "
                             "Z-Image-Turbo")


def weight_bytes(path: str, storage: str, dtype: torch.dtype) -> int:
    """Bytes the Turbo transformer's weights take once loaded in `storage` (fp8: 1 byte per block weight)."""
    _, _, shapes = transformer_checkpoint(Path(path))
    per = 1 if storage == "fp8" else torch.empty((), dtype=dtype).element_size()
    return sum(int(torch.Size(s).numel()) * per for s in shapes.values())


def turbo_model_or_reason(path: str, lora: Lora, device: torch.device, dtype: torch.dtype,
                          storage: str) -> tuple[torch.nn.Module | None, str]:
    """Turbo + the LoRA (frozen, eval) on `device`, or None and why it was skipped."""
    storage = storage if storage in ("bf16", "fp8") else "fp8"
    if device.type == "cuda":
        need, free = weight_bytes(path, storage, dtype) + MARGIN_BYTES, torch.cuda.mem_get_info(device)[0]
        if need > free:
            return None, (f"Turbo preview skipped: Z-Image-Turbo needs {need / 2**30:.1f} GiB with its "
                          f"margin, {free / 2**30:.1f} GiB free (train with a smaller memory plan to see it)")
    model = load_transformer(path, dtype, device, storage=storage)
    load_lora_into_peft(model, lora, "zit", trainable=False)
    return model.eval(), ""


def preview_model_rows(model: torch.nn.Module, p: Any, distilled: bool, lora: Callable[[], Lora],
                       device: torch.device, dtype: torch.dtype, storage: str,
                       log: Callable[[str], None]) -> list[tuple[torch.nn.Module, SamplerSettings]]:
    """(model, sampler) per preview row: the training model's rows, then Turbo + the LoRA when
    `p.turbo_model` is set and fits (`lora()` is called only then)."""
    rows = [(model, r) for r in preview_rows(p, distilled)]
    if p.turbo_model:
        turbo, why = turbo_model_or_reason(p.turbo_model, lora(), device, dtype, storage)
        if turbo is None:
            log(why)
        else:
            label = f"Turbo + LoRA {p.turbo_steps} steps cfg 1"
            rows.append((turbo, SamplerSettings(label, p.turbo_steps, 1.0)))
    return rows

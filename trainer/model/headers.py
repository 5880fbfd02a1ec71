"""Safetensors headers, checkpoint files and what a file is: the checks made before anything loads."""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ZitError

PathLike = str | Path


class ModelLoadError(ZitError):
    """A model file or folder we refuse; the message says which file and why."""


# ----------------------------------------------------------------------------------------------------
# Safetensors headers and what a file is
# ----------------------------------------------------------------------------------------------------

_BF16_HINT = "use the bf16 file (z_image_turbo_bf16.safetensors)"
_GGUF = f"GGUF checkpoints are not supported for training; {_BF16_HINT}"
_TE_HINT = "use the bf16 file (qwen_3_4b.safetensors)"
_VAE_HINT = "use the bf16/fp32 Flux VAE (ae.safetensors)"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its dtype code (e.g. `BF16`, `F8_E4M3`) and shape."""

    dtype: str
    shape: tuple[int, ...]


def read_header(path: PathLike) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the tensors in a safetensors file, read from the header alone."""
    return read_header_and_metadata(path)[0]


def read_header_and_metadata(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors header (as read_header) and its `__metadata__` strings."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] == b"GGUF":
            raise ModelLoadError(f"{path.name}: {_GGUF}")
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 0 < size < _MAX_HEADER:
            raise ModelLoadError(f"{path.name}: not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path.name}: not a safetensors file ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    try:
        infos = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    except (TypeError, KeyError) as e:
        raise ModelLoadError(f"{path.name}: not a safetensors file (bad header entry: {e})") from e
    return infos, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


_COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora_unet_", "lycoris_", "hada_w", "lokr_w")


def _strip_prefix(key: str) -> str:
    for prefix in _COMFY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _quantization(infos: dict[str, TensorInfo], hint: str = _BF16_HINT) -> str | None:
    """Why a checkpoint is quantized in a way we cannot train on, or None."""
    if any(i.dtype.startswith("F8") for i in infos.values()) or any(
        k.endswith(("scale_weight", "weight_scale", "scaled_fp8")) for k in infos
    ):
        return f"fp8 (scaled) checkpoints are not supported for training; {hint}"
    if any(k.endswith("qweight") or ".w13." in k for k in infos):
        return f"a Nunchaku-quantized model (qweight): not supported for training; {hint}"
    return None


def _looks_like(keys: set[str]) -> str:
    """A short description of what a non-Z-Image checkpoint looks like."""
    if any(k.endswith(".alpha") or any(m in k for m in _LORA_MARKERS) for k in keys):
        return "this is a LoRA, not a base model; load the Z-Image-Turbo transformer and the LoRA separately"
    if any("double_blocks." in k or "single_transformer_blocks." in k for k in keys):
        return "it looks like a Flux transformer (double_blocks), not Z-Image"
    if any(k.startswith(("encoder.down", "decoder.up", "first_stage_model.", "vae.")) for k in keys):
        return "it looks like a VAE, not the Z-Image transformer"
    if any(re.match(r"(.*\.)?layers\.\d+\.self_attn\.q_proj\.", k) for k in keys):
        return "it looks like a text encoder (LLM), not the Z-Image transformer"
    if any("input_blocks." in k or k.startswith("down_blocks.") for k in keys):
        return "it looks like an SD/SDXL UNet (input_blocks/down_blocks), not Z-Image"
    if any(re.match(r"(.*\.)?blocks\.\d+\.self_attn\.", k) for k in keys):
        return "it looks like a Wan video transformer (blocks.N.self_attn), not Z-Image"
    sample = ", ".join(sorted(keys)[:5])
    return f"no Z-Image transformer weights (layers.N.attention.qkv or to_q) found; first keys: {sample}"


def _refuse_non_zit(name: str, infos: dict[str, TensorInfo]) -> None:
    """Raise ModelLoadError unless the header is a Z-Image transformer (its quantization is checked apart)."""
    keys = {_strip_prefix(k) for k in infos}
    if not any(re.fullmatch(r"layers\.\d+\.attention\.(qkv|to_q)\.weight", k) for k in keys):
        raise ModelLoadError(f"{name}: {_looks_like(keys)}")
    embed_keys = ("x_embedder.weight", "all_x_embedder.2-1.weight")
    embeds = [infos[k] for k in infos if _strip_prefix(k) in embed_keys]
    if embeds and embeds[0].shape[0] == 2304:
        raise ModelLoadError(f"{name}: a NextDiT with dim 2304: this is Lumina 2, not Z-Image")



def _max_index(shapes: Iterable[str], kind: str) -> int:
    found = [int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0



def _names(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _read_diffusers_config(path: Path, class_name: str) -> dict:
    config = json.loads(path.read_text())
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ModelLoadError(f"{path}: this config is for {found}, not {class_name}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a diffusers/transformers folder: its index's shards, or the single file."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in {index.name} are missing: {_names(missing)}")
        return [folder / s for s in shards]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")):
        raise ModelLoadError(f"{folder}: only .bin weights found; convert them to safetensors")
    raise ModelLoadError(f"{folder}: no {stem}.safetensors (or sharded index) found")



def _check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise ModelLoadError naming the missing, unexpected or mis-shaped weights."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    if missing:
        raise ModelLoadError(f"{source}: missing {len(missing)} weights: {_names(missing)}")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected weights {_names(unexpected)}")
    wrong = [f"{k} {shapes[k]} (model {expected[k]})" for k in sorted(expected) if shapes[k] != expected[k]]
    if wrong:
        raise ModelLoadError(f"{source}: shape mismatch: {_names(wrong)}")




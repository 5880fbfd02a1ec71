"""Key conversion between ComfyUI's fused NextDiT layout and diffusers' layout, per tensor.

Mirrors diffusers' convert_z_image_transformer_checkpoint_to_diffusers.
"""

from __future__ import annotations

import re

import torch

from .headers import TensorInfo, _strip_prefix

_LEADING_RENAMES = (("x_embedder.", "all_x_embedder.2-1."), ("final_layer.", "all_final_layer.2-1."))
_INNER_RENAMES = (
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)
_DROPPED = ("norm_final.weight",)
_QKV = ".attention.qkv.weight"


def diffusers_keys(key: str) -> list[str]:
    """The diffusers name(s) of a checkpoint key: three for a fused qkv (rows q, k, v), none if dropped."""
    key = _strip_prefix(key)
    if key in _DROPPED:
        return []
    for old, new in _LEADING_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
    for old, new in _INNER_RENAMES:
        key = key.replace(old, new)
    if key.endswith(_QKV):
        stem = key[: -len("qkv.weight")]
        return [f"{stem}to_{x}.weight" for x in "qkv"]
    return [key]


def _convert_tensor(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Diffusers (name, tensor) pairs of one checkpoint tensor; q, k, v get their own storage."""
    names = diffusers_keys(key)
    if len(names) == 3:
        return list(zip(names, (c.clone() for c in tensor.chunk(3, dim=0)), strict=True))
    return [(n, tensor) for n in names]


def _converted_shapes(infos: dict[str, TensorInfo]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for key, info in infos.items():
        names = diffusers_keys(key)
        shape = (info.shape[0] // 3, *info.shape[1:]) if len(names) == 3 else info.shape
        shapes.update(dict.fromkeys(names, shape))
    return shapes


def to_comfy_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in ComfyUI's NextDiT layout (fused qkv), e.g. for test fixtures."""
    out = {}
    for key, tensor in state_dict.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        new = key
        for comfy, diff in _INNER_RENAMES:
            new = new.replace(diff, comfy)
        for comfy, diff in _LEADING_RENAMES:
            if new.startswith(diff):
                new = comfy + new[len(diff):]
        if new.endswith(".attention.to_q.weight"):
            stem = key[: -len("to_q.weight")]
            new = new.replace(".attention.to_q.weight", _QKV)
            tensor = torch.cat([state_dict[f"{stem}to_{x}.weight"] for x in "qkv"])
        out[prefix + new] = tensor
    return out




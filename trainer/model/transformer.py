"""The Z-Image transformer: its config, construction on meta, offline loading and the velocity forward."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from safetensors import safe_open
from torch import nn

from ..lora.spec import ZIT, ZitSpec
from .headers import (
    _GGUF,
    ModelLoadError,
    PathLike,
    _check_shapes,
    _read_diffusers_config,
    _refuse_non_zit,
    read_header,
    weight_files,
)
from .keys import _convert_tensor, _converted_shapes

ZIT_AXES_LENS = [1536, 512, 512]


def transformer_config(spec: ZitSpec = ZIT) -> dict:
    """ZImageTransformer2DModel kwargs for a spec; rope axes keep ZIT's 2:3:3 split of the head dim."""
    head_dim = spec.dim // spec.n_heads
    if head_dim * spec.n_heads != spec.dim or head_dim % 16:
        raise ModelLoadError(f"dim {spec.dim} with {spec.n_heads} heads: head dim must be a multiple of 16")
    return {
        "all_patch_size": [spec.patch_size],
        "all_f_patch_size": [1],
        "in_channels": spec.in_channels,
        "dim": spec.dim,
        "n_layers": spec.n_layers,
        "n_refiner_layers": spec.n_refiner_layers,
        "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_heads,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": spec.cap_feat_dim,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8],
        "axes_lens": list(ZIT_AXES_LENS),
    }


def _max_index(shapes: Iterable[str], kind: str) -> int:
    found = [int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


def spec_from_shapes(shapes: dict[str, tuple[int, ...]]) -> ZitSpec:
    """The ZitSpec of diffusers-named weight shapes: dims from x_embedder, q_norm and cap_embedder."""
    needed = ("all_x_embedder.2-1.weight", "layers.0.attention.norm_q.weight", "cap_embedder.1.weight")
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise ModelLoadError(f"cannot infer the Z-Image config: missing {', '.join(missing)}")
    dim, patch_in = shapes[needed[0]]
    head_dim = shapes[needed[1]][0]
    return ZitSpec(
        dim=dim,
        n_layers=_max_index(shapes, "layers"),
        n_refiner_layers=_max_index(shapes, "noise_refiner"),
        n_heads=dim // head_dim,
        cap_feat_dim=shapes[needed[2]][1],
        in_channels=patch_in // 4,
        patch_size=2,
    )


def model_spec(model: ZImageTransformer2DModel) -> ZitSpec:
    """The ZitSpec of a built transformer, read from its config."""
    c = model.config
    return ZitSpec(dim=c.dim, n_layers=c.n_layers, n_refiner_layers=c.n_refiner_layers, n_heads=c.n_heads,
                   cap_feat_dim=c.cap_feat_dim, in_channels=c.in_channels, patch_size=c.all_patch_size[0])


def _instantiate(config: dict, device: torch.device | str) -> ZImageTransformer2DModel:
    with torch.device(device):
        return ZImageTransformer2DModel.from_config(config)


def build_transformer(spec: ZitSpec = ZIT, device: torch.device | str = "meta") -> ZImageTransformer2DModel:
    """A ZImageTransformer2DModel of this spec; on `meta` (the default) it holds no memory."""
    return _instantiate(transformer_config(spec), device)




def _transformer_source(path: Path) -> tuple[list[Path], dict | None]:
    """The weight files of a transformer checkpoint and its diffusers config (None for a single file)."""
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            raise ModelLoadError(f"{path.name}: {_GGUF}")
        return [path], None
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path}: a folder without config.json; expected a diffusers Z-Image folder "
                             "or its transformer/ subfolder")
    config = _read_diffusers_config(folder / "config.json", "ZImageTransformer2DModel")
    return weight_files(folder, "diffusion_pytorch_model"), config



def _load_file_into(model: nn.Module, path: Path, dtype: torch.dtype, device: torch.device | str) -> None:
    """Load one safetensors file into a (meta) model tensor by tensor, converting names, dtype and device."""
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            tensors.update(_convert_tensor(key, f.get_tensor(key).to(device=device, dtype=dtype)))
    model.load_state_dict(tensors, strict=False, assign=True)


def transformer_checkpoint(
    path: Path, trainable: bool = True
) -> tuple[list[Path], dict | None, dict[str, tuple[int, ...]]]:
    """Weight files, diffusers config (None for a single file) and diffusers-named shapes of a checkpoint.

    Refuses what is not a Z-Image transformer; with `trainable`, also fp8-scaled checkpoints.
    """
    files, config = _transformer_source(path)
    infos = {k: v for f in files for k, v in read_header(f).items()}
    _refuse_non_zit(path.name, infos, trainable)
    return files, config, _converted_shapes(infos)


def checkpoint_spec(path: PathLike) -> ZitSpec:
    """The ZitSpec of a transformer checkpoint, from headers alone; refuses what load_transformer refuses."""
    return spec_from_shapes(transformer_checkpoint(Path(path))[2])


def load_transformer(
    path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> ZImageTransformer2DModel:
    """Load a ZIT transformer (ComfyUI single file or diffusers folder) offline; frozen, eval mode."""
    path = Path(path)
    files, config, shapes = transformer_checkpoint(path)
    model = _instantiate(config or transformer_config(spec_from_shapes(shapes)), "meta")
    _check_shapes(model, shapes, path.name)
    for f in files:
        _load_file_into(model, f, dtype, device)
    return model.requires_grad_(False).eval()


def predict_velocity(
    model: ZImageTransformer2DModel,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    text_embeds: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Velocity (noise - x0) at noise levels `sigmas` of latents (B,C,H,W): the negated model output, fp32."""
    if len(text_embeds) != latents.shape[0] or sigmas.shape != (latents.shape[0],):
        raise ValueError(f"batch mismatch: latents {tuple(latents.shape)}, sigmas {tuple(sigmas.shape)}, "
                         f"{len(text_embeds)} text embeddings")
    dtype = model.x_pad_token.dtype
    x = list(latents.to(dtype).unsqueeze(2).unbind(0))
    t = 1.0 - sigmas.to(device=latents.device, dtype=torch.float32)
    out = model(x, t, [e.to(dtype) for e in text_embeds], return_dict=False)[0]
    return -torch.stack(out).squeeze(2).float()





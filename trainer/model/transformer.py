"""The Z-Image transformer: its config, construction on meta, offline loading and the velocity forward."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from torch import nn

from ..lora.spec import ZIT, ZitSpec
from .checkpoint_quant import (
    QuantLayout,
    StoredWeight,
    aux_keys,
    checkpoint_layout,
    read_weights,
    refuse_foreign_quantization,
)
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
from .keys import _converted_shapes, diffusers_keys
from .quantize import (
    QUANTIZED_MODULES,
    Fp8Linear,
    bitsandbytes,
    bnb_linear,
    check_storage,
    mark_storage,
    quantize_fp8,
)

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



def _inspect(path: Path, trainable: bool) -> tuple[list[Path], dict | None, dict[str, tuple[int, ...]],
                                                  QuantLayout | None]:
    """transformer_checkpoint's answer and, when `trainable`, the checkpoint's QuantLayout."""
    files, config = _transformer_source(path)
    if trainable:
        infos, layout = checkpoint_layout(files, path.name)
        weights = layout.model_infos(infos)
    else:  # ComfyUI samples every format it knows: only what nobody reads is refused
        infos, layout = {k: v for f in files for k, v in read_header(f).items()}, None
        refuse_foreign_quantization(path.name, infos)
        aux = aux_keys(infos)
        weights = {k: v for k, v in infos.items() if k not in aux}
    _refuse_non_zit(path.name, weights)
    return files, config, _converted_shapes(weights), layout


def transformer_checkpoint(
    path: Path, trainable: bool = True
) -> tuple[list[Path], dict | None, dict[str, tuple[int, ...]]]:
    """Weight files, diffusers config (None for a single file) and diffusers-named shapes of a checkpoint.

    Refuses what is not a Z-Image transformer and Nunchaku/bitsandbytes files; with `trainable`, also
    quantized formats we cannot decode (nvfp4, mxfp8, convrot, unknown ones). fp8 and int8_tensorwise pass.
    """
    return _inspect(Path(path), trainable)[:3]


def _chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [c.clone() for c in tensor.chunk(3, dim=0)]


def _diffusers_parts(key: str, value: torch.Tensor | StoredWeight
                     ) -> Iterator[tuple[str, torch.Tensor | StoredWeight]]:
    """Diffusers (name, part) pairs of one checkpoint weight; a fused qkv is split into rows q, k, v."""
    names = diffusers_keys(key)
    if len(names) == 3:
        parts = value.split_rows(3) if isinstance(value, StoredWeight) else _chunks(value)
        yield from zip(names, parts, strict=True)
    else:
        yield from ((n, value) for n in names)


def _stored_linear(value: torch.Tensor | StoredWeight, storage: str, dtype: torch.dtype,
                   device: torch.device | str) -> nn.Linear:
    """A frozen bias-less Linear module holding one block weight in `storage` (the bias is set afterwards)."""
    if storage == "fp8":
        stored = value.to(device)
        q, scale = stored.as_fp8() if isinstance(stored, StoredWeight) else quantize_fp8(stored)
        return Fp8Linear(q, scale, None, dtype)
    weight = value.dequantize(dtype) if isinstance(value, StoredWeight) else value
    return bnb_linear(weight, None, storage, dtype, device)


def _load_weights(model: nn.Module, files: list[Path], layout: QuantLayout, dtype: torch.dtype,
                  device: torch.device | str, storage: str, block_device: torch.device | str | None) -> None:
    """Fill a meta model from a checkpoint tensor by tensor: names converted, quantized weights decoded, the
    QUANTIZED_MODULES Linears swapped for their `storage` modules as each weight arrives."""
    tensors, linears = {}, {}
    for key, value in read_weights(files, layout):
        for name, part in _diffusers_parts(key, value):
            target = block_device if block_device is not None and name.startswith("layers.") else device
            module, _, leaf = name.rpartition(".")
            if storage != "bf16" and leaf == "weight" and QUANTIZED_MODULES.fullmatch(module):
                linears[module] = _stored_linear(part, storage, dtype, target)
            elif isinstance(part, StoredWeight):
                tensors[name] = part.to(target).dequantize(dtype)
            else:
                tensors[name] = part.to(device=target, dtype=dtype)
    for module, linear in linears.items():
        bias = tensors.pop(f"{module}.bias", None)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    model.load_state_dict(tensors, strict=False, assign=True)


def checkpoint_spec(path: PathLike) -> ZitSpec:
    """The ZitSpec of a transformer checkpoint, from headers alone; refuses what load_transformer refuses."""
    return spec_from_shapes(transformer_checkpoint(Path(path))[2])


def load_transformer(
    path: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    storage: str = "bf16",
    block_device: torch.device | str | None = None,
) -> ZImageTransformer2DModel:
    """Load a ZIT transformer (ComfyUI single file or diffusers folder, bf16/fp32 or fp8/int8-quantized)
    offline; frozen, eval mode.

    `storage` holds the block Linears (QUANTIZED_MODULES): "bf16" = in `dtype` like every other weight
    (quantized files decoded); "fp8" = Fp8Linear (a file's e4m3fn weight and scale kept as stored, other
    weights quantized per row); "nf4" / "int8" = bitsandbytes layers (QLoRA). With `block_device` the main
    blocks' (layers.N) weights go there instead of `device`, for block swap (bf16 and fp8 only).
    """
    path = Path(path)
    check_storage(storage)
    if storage in ("nf4", "int8"):
        if block_device is not None:
            raise ModelLoadError(f'{path.name}: block swap streams bf16 or fp8 blocks, not "{storage}" ones')
        bitsandbytes(storage)
    files, config, shapes, layout = _inspect(path, trainable=True)
    model = _instantiate(config or transformer_config(spec_from_shapes(shapes)), "meta")
    _check_shapes(model, shapes, path.name)
    _load_weights(model, files, layout, dtype, device, storage, block_device)
    mark_storage(model, storage)
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





"""The 16-channel Flux VAE with Z-Image's latent convention, loaded offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file

from .headers import (
    _VAE_HINT,
    ModelLoadError,
    PathLike,
    _check_shapes,
    _looks_like,
    _max_index,
    _quantization,
    _read_diffusers_config,
    read_header,
)

FLUX_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
_LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass
class Vae:
    """The Flux VAE with ZIT's latent convention z = (latent - shift) * scale."""

    model: AutoencoderKL

    @property
    def scale(self) -> float:
        return self.model.config.scaling_factor

    @property
    def shift(self) -> float:
        return self.model.config.shift_factor

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """ZIT latents (fp32) of images in [-1, 1] (B,3,H,W): the mode, or a sample given a generator."""
        if images.shape[-1] % 16 or images.shape[-2] % 16:
            raise ValueError(f"image sides must be multiples of 16, got {tuple(images.shape[-2:])}")
        x = images.to(device=self.model.device, dtype=self.model.dtype)
        dist = self.model.encode(x).latent_dist
        latent = dist.mode() if generator is None else dist.sample(generator)
        return (latent.float() - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32) from ZIT latents, as ZImagePipeline decodes them."""
        latent = z.to(device=self.model.device, dtype=self.model.dtype) / self.scale + self.shift
        return self.model.decode(latent).sample.float().clamp(-1, 1)


def vae_config_from_bfl(shapes: dict[str, tuple[int, ...]]) -> dict:
    """AutoencoderKL kwargs for a BFL/LDM-layout VAE (keys without prefix): sizes read, the rest Flux's."""
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]
                for i in range(_max_index(shapes, "encoder.down"))]
    return {
        **FLUX_VAE,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": _max_index(shapes, "encoder.down.0.block"),
        "latent_channels": shapes["encoder.conv_out.weight"][0] // 2,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def _strip_vae_prefix(key: str) -> str:
    for prefix in _LDM_VAE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _load_bfl_vae(path: Path, dtype: torch.dtype, device: torch.device | str) -> AutoencoderKL:
    """AutoencoderKL from a BFL `ae.safetensors` (LDM key layout), via diffusers' LDM VAE converter."""
    infos = read_header(path)
    reason = _quantization(infos, _VAE_HINT)
    if reason:
        raise ModelLoadError(f"{path.name}: {reason}")
    shapes = {_strip_vae_prefix(k): v.shape for k, v in infos.items()}
    if "encoder.down.0.block.0.conv1.weight" not in shapes:
        hint = ("a diffusers-layout VAE file: pass its folder (with config.json)"
                if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes else _looks_like(set(shapes)))
        raise ModelLoadError(f"{path.name}: not a BFL/LDM VAE; {hint}")
    config = vae_config_from_bfl(shapes)
    raw = {_strip_vae_prefix(k): v for k, v in load_file(str(path)).items()}
    state = convert_ldm_vae_checkpoint(raw, config)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    _check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, path.name)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model


def _vae_folder(path: Path) -> Path:
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{path}: expected a diffusers folder with a vae/ subfolder, or ae.safetensors")
    _read_diffusers_config(folder / "config.json", "AutoencoderKL")
    return folder


def load_vae(path: PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> Vae:
    """Load the 16-channel Flux VAE offline from a diffusers folder or a BFL `ae.safetensors`."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_file():
        model = _load_bfl_vae(path, dtype, device)
    else:
        folder = _vae_folder(path)
        model = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        model = model.to(device)
    if model.config.latent_channels != 16:
        raise ModelLoadError(f"{path.name}: this VAE has {model.config.latent_channels} latent channels; "
                             "Z-Image needs the 16-channel Flux VAE (ae.safetensors)")
    return Vae(model.requires_grad_(False).eval())




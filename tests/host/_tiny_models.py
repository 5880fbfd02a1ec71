"""The tiny Z-Image files the host tests run on, written under the file names the workflows use.

write_tiny_models(comfyui, base) fills base/models (a ComfyUI --base-directory):

- the transformer at full width (dim 3840: ComfyUI detects Z-Image by it) with 1 main layer (+ the 2 noise
  and 2 context refiners ComfyUI always builds), as a diffusion_models file and as a diffusers folder;
- a Flux-shaped VAE (ComfyUI fixes its encoder widths), written as ae.safetensors and in the diffusers folder;
- "qwen_3_4b.safetensors" is a random CLIP-L text model: ComfyUI's Qwen3-4B text encoder has a fixed 4B shape,
  too big for a CPU test, and CLIPLoader(type lumina2) loads a CLIP-L file as an SD1 CLIP. Its 768-wide
  output is the tiny transformer's cap_feat_dim, so CLIPLoader -> CLIPTextEncode -> KSampler runs as in the
  real graph; the diffusers folder's text encoder is a tiny Qwen3 that Load ZIT must refuse;
- LoRAs (user, second, DistillPatch, training adapter) of rank 4 for the tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# The file names the workflows use; write_tiny_models writes tiny files under these names.
UNET = "z_image_turbo_bf16.safetensors"
UNET_FP8 = "z_image_turbo_fp8_scaled.safetensors"  # the same weights, block Linears in ComfyUI's scaled fp8
UNET_BASE = "z_image_bf16.safetensors"  # stands for the Z-Image base: the same tiny weights, marked as base
FUN_DISTILL = "Z-Image-Fun-Lora-Distill-8-Steps.safetensors"  # alibaba-pai's `lora_unet__layers_N_` keys
CLIP = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
LORAS = {  # name -> (seed, dialect, with adaLN)
    "zit_my_lora.safetensors": (1, "aitoolkit", True),
    "zit_other_lora.safetensors": (2, "comfy", True),
    "z_image_turbo_distill_patch_lora_bf16.safetensors": (3, "diffsynth", False),
    "zimage_turbo_training_adapter_v2.safetensors": (4, "aitoolkit", True),
}
DIFFUSERS = "Z-Image-Turbo-tiny"
NOT_ZIT = {  # a diffusion_models file that is not the Z-Image transformer -> what the refusal must say
    "flux_dev_not_zit.safetensors": "Flux",
    "a_lora_not_a_model.safetensors": "LoRA",
}
TINY = {"dim": 3840, "n_layers": 1, "n_refiner_layers": 2, "n_heads": 30, "cap_feat_dim": 768,
        "in_channels": 16}


def _fill_random(state: dict, seed: int) -> None:
    """Seeded values in place: matrices ~ U with variance 1/fan_in, biases 0, norm weights 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in state.items():
            if t.ndim >= 2:
                bound = (3.0 / t.shape[-1]) ** 0.5
                t.uniform_(-bound, bound, generator=gen)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.fill_(1.0)


def _tiny_transformer(spec: Any):
    import torch

    from trainer.model import build_transformer

    model = build_transformer(spec).to(torch.bfloat16).to_empty(device="cpu")
    _fill_random(model.state_dict(), seed=0)
    return model.eval()


def _write_vae(models: Path, diffusers_root: Path) -> None:
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from trainer.model import FLUX_VAE
    from trainer.tiny import vae_to_bfl

    vae = AutoencoderKL.from_config(FLUX_VAE).to(torch.bfloat16)
    _fill_random(vae.state_dict(), seed=1)
    save_file(vae_to_bfl(vae.state_dict(), len(FLUX_VAE["block_out_channels"])), models / "vae" / VAE)
    vae.save_pretrained(diffusers_root / "vae")


def _write_clip_l(comfyui: Path, path: Path) -> None:
    """A random CLIP-L text model (ComfyUI's sd1_clip_config.json sizes) with its text projection."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = json.loads((comfyui / "comfy" / "sd1_clip_config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    save_file({k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}, path)


def _write_loras(spec: Any, loras: Path) -> None:
    from trainer.lora.spec import BASE
    from trainer.lora.synth import random_lora
    from trainer.lora.writing import write_lora

    for name, (seed, dialect, adaln) in LORAS.items():
        keys = [k for k in spec.module_keys() if k[0] != BASE and (adaln or k[1] != "adaLN")]
        write_lora(random_lora(rank=4, spec=spec, keys=keys, seed=seed), loras / name, dialect, "bf16")
    _write_fun_distill(spec, loras / FUN_DISTILL)


def _write_fun_distill(spec: Any, path: Path) -> None:
    """A base distill LoRA as alibaba-pai ships it: kohya names with a double underscore, alpha per layer."""
    from safetensors.torch import load_file, save_file

    from trainer.lora.spec import BASE
    from trainer.lora.synth import random_lora
    from trainer.lora.writing import write_lora

    keys = [k for k in spec.module_keys() if k[0] != BASE]
    write_lora(random_lora(rank=4, spec=spec, keys=keys, seed=5), path, "kohya", "bf16")
    state = load_file(str(path))
    save_file({k.replace("lora_unet_", "lora_unet__", 1): v for k, v in state.items()}, str(path))


def _write_not_zit(models: Path) -> None:
    import torch
    from safetensors.torch import save_file

    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8), "img_in.weight": torch.zeros(8, 64)}
    names = iter(NOT_ZIT)
    save_file(flux, models / "diffusion_models" / next(names))
    shutil.copy(models / "loras" / next(iter(LORAS)), models / "diffusion_models" / next(names))


def _scaled_fp8(state: dict) -> dict:
    """A ComfyUI state dict in the old scaled-fp8 layout: block Linears as float8_e4m3fn with a per-tensor
    `scale_weight`, the `scaled_fp8` marker, everything else as it was."""
    import re

    import torch

    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    block_linear = re.compile(r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|"
                              r"feed_forward\.w[123])\.weight")
    for key, w in state.items():
        if not block_linear.fullmatch(key):
            out[key] = w
            continue
        scale = w.float().abs().amax() / 448.0
        out[key] = (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
    return out


def write_tiny_models(comfyui: Path, base: Path) -> None:
    """Tiny Z-Image files under base/models, in ComfyUI's folders and as a diffusers folder."""
    from safetensors.torch import save_file

    from trainer.lora.spec import ZitSpec
    from trainer.model import to_comfy_state_dict
    from trainer.tiny import tiny_text_encoder

    models = base / "models"
    root = models / "diffusers" / DIFFUSERS
    for sub in ("diffusion_models", "text_encoders", "vae", "loras", "diffusers"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    spec = ZitSpec(**TINY)
    transformer = _tiny_transformer(spec)
    comfy_sd = to_comfy_state_dict(transformer.state_dict())
    save_file(comfy_sd, models / "diffusion_models" / UNET)
    save_file(_scaled_fp8(comfy_sd), models / "diffusion_models" / UNET_FP8)
    save_file(comfy_sd, models / "diffusion_models" / UNET_BASE, metadata={"zit.family": "base"})
    transformer.save_pretrained(root / "transformer", max_shard_size="500MB")
    del transformer
    (root / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    tiny_text_encoder().model.save_pretrained(root / "text_encoder")
    _write_vae(models, root)
    _write_clip_l(comfyui, models / "text_encoders" / CLIP)
    _write_loras(spec, models / "loras")
    _write_not_zit(models)

"""Load ZIT: the Z-Image-Turbo diffusion model (ComfyUI file or diffusers folder), text encoder and VAE.

A single file goes through `comfy.sd.load_diffusion_model`, which records `cached_patcher_init` (ComfyUI's
reload recipe). A diffusers folder's transformer shards are merged, converted to ComfyUI's layout
(`trainer.model.to_comfy_state_dict`) and loaded with `comfy.sd.load_diffusion_model_state_dict`; the
MODEL then records `(load_diffusers_transformer, (folder, model_options))` the same way. A trainer gets a
fresh copy from either through `model_source(model)` (path + dtype) or by calling the recipe. What is not
a Z-Image transformer (a LoRA, Flux, SDXL, Wan, Lumina 2, GGUF, Nunchaku) is refused before loading by
`trainer.model.transformer_checkpoint`, with its message; ComfyUI's fp8 and int8 files load for sampling,
and ZIT Train trains on them too (formats the engine cannot decode, such as nvfp4, are refused there).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import io

CATEGORY = "ZIT"
NONE = "none"
FROM_DIFFUSERS = "from diffusers folder"
DTYPES = ("default", "bf16", "fp16", "fp32")
TRANSFORMER_CLASS = "ZImageTransformer2DModel"
VAE_CHANNELS = 16


def _is_zit_folder(path: str) -> bool:
    """A diffusers Z-Image pipeline root (transformer/config.json) or transformer folder (config.json)."""
    for config in (os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")):
        if os.path.isfile(config):
            try:
                with open(config, encoding="utf-8") as f:
                    return json.load(f).get("_class_name") == TRANSFORMER_CLASS
            except (OSError, ValueError, AttributeError):
                return False
    return False


def diffusers_folders() -> dict[str, tuple[str, str]]:
    """Z-Image diffusers folders under the diffusers and diffusion_models folders: name -> (kind, path).

    The name is the folder's path relative to its models folder plus a trailing "/", e.g. "Z-Image-Turbo/".
    """
    found: dict[str, tuple[str, str]] = {}
    for kind in ("diffusers", "diffusion_models"):
        for root in folder_paths.get_folder_paths(kind):
            for dirpath, dirnames, _ in os.walk(root, followlinks=True):
                if dirpath != root and _is_zit_folder(dirpath):
                    name = Path(os.path.relpath(dirpath, root)).as_posix() + "/"
                    found.setdefault(name, (kind, dirpath))
                    dirnames.clear()
                dirnames.sort()
    return found


def model_choices() -> list[str]:
    """diffusion_models files (minus the shards of diffusers folders kept there), then diffusers folders."""
    folders = diffusers_folders()
    inside = tuple(name for name, (kind, _) in folders.items() if kind == "diffusion_models")
    files = [f for f in folder_paths.get_filename_list("diffusion_models") if not f.startswith(inside)]
    return files + sorted(folders)


def _files(kind: str) -> list[str]:
    return folder_paths.get_filename_list(kind)


def _model_options(weight_dtype: str) -> dict[str, Any]:
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return {"dtype": dtypes[weight_dtype]} if weight_dtype in dtypes else {}


def _resolve_model(name: str) -> Path:
    if name.endswith("/"):
        folders = diffusers_folders()
        if name not in folders:
            raise FileNotFoundError(f"diffusers folder {name!r} not found under the diffusers or "
                                    "diffusion_models folders (refresh the node list after adding it)")
        return Path(folders[name][1])
    return Path(folder_paths.get_full_path_or_raise("diffusion_models", name))


def _diffusers_part(source: Path, part: str, what: str) -> Path:
    """The `part` subfolder (text_encoder, vae) of the diffusers folder the model was loaded from."""
    if source.is_file():
        raise ValueError(f"{what} '{FROM_DIFFUSERS}': the model {source.name} is a single file, not a "
                         f"diffusers folder; pick a {what} file instead")
    is_root = (source / "transformer").is_dir() or (source / "model_index.json").is_file()
    root = source if is_root else source.parent
    folder = root / part
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{root}: no {part}/ folder with config.json; pick a {what} file instead")
    return folder


def _part_path(name: str, source: Path, kind: str, part: str, what: str) -> Path | None:
    """A text encoder or VAE choice as a path: a file in `kind`, the diffusers `part` folder, or None."""
    if name == NONE:
        return None
    if name == FROM_DIFFUSERS:
        return _diffusers_part(source, part, what)
    return Path(folder_paths.get_full_path_or_raise(kind, name))


def _merged(files: list[Path]) -> dict:
    """The tensors of several safetensors shards as one state dict."""
    import comfy.utils

    sd: dict = {}
    for file in files:
        sd.update(comfy.utils.load_torch_file(str(file), safe_load=True))
    return sd


def _merged_weights(folder: Path, stem: str) -> dict:
    """All tensors of a diffusers/transformers folder's weights (`stem`.safetensors or its sharded index)."""
    from ..trainer.model import weight_files

    return _merged(weight_files(folder, stem))


def load_diffusers_transformer(folder: str, model_options: dict, disable_dynamic: bool = False) -> Any:
    """A ComfyUI MODEL from a Z-Image diffusers folder: shards merged, converted to ComfyUI's fused layout.

    Records itself as the MODEL's `cached_patcher_init`, as `comfy.sd.load_diffusion_model` does for files.
    """
    import comfy.sd

    from ..trainer.model import ModelLoadError, to_comfy_state_dict, transformer_checkpoint

    files, _, _ = transformer_checkpoint(Path(folder), trainable=False)
    sd = to_comfy_state_dict(_merged(files))
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options,
                                                     disable_dynamic=disable_dynamic)
    if model is None:
        raise ModelLoadError(f"{folder}: ComfyUI did not recognise the converted transformer as Z-Image")
    model.cached_patcher_init = (load_diffusers_transformer, (folder, model_options))
    return model


def load_zit_model(path: Path, model_options: dict) -> Any:
    """The ComfyUI MODEL of a ZIT file or diffusers folder; refuses what is not Z-Image."""
    import comfy.sd

    from ..trainer.model import transformer_checkpoint

    if path.is_dir():
        return load_diffusers_transformer(str(path), model_options)
    transformer_checkpoint(path, trainable=False)  # any quantized file ComfyUI samples; training is stricter
    return comfy.sd.load_diffusion_model(str(path), model_options=model_options)


@dataclass(frozen=True)
class ModelSource:
    """Where a ZIT MODEL was loaded from (file or diffusers folder); dtype None = as stored."""

    path: str
    dtype: Any


def model_source(model: Any) -> ModelSource | None:
    """The source of a MODEL from Load ZIT or the core UNETLoader (its cached_patcher_init), else None."""
    import comfy.sd

    init = getattr(model, "cached_patcher_init", None)
    if not init or init[0] not in (comfy.sd.load_diffusion_model, load_diffusers_transformer):
        return None
    args = init[1]
    options = args[1] if len(args) > 1 else {}
    return ModelSource(str(args[0]), options.get("dtype"))


def _check_text_encoder_config(folder: Path) -> None:
    from ..trainer.model import QWEN3_4B, ModelLoadError

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    got = (config.get("model_type"), config.get("hidden_size"), config.get("num_hidden_layers"))
    want = ("qwen3", QWEN3_4B["hidden_size"], QWEN3_4B["num_hidden_layers"])
    if got != want:
        raise ModelLoadError(f"{folder}: a {got[0]} text encoder with hidden size {got[1]} and {got[2]} "
                             f"layers; ComfyUI's Z-Image text encoder is Qwen3-4B (hidden size {want[1]}, "
                             f"{want[2]} layers)")


def load_clip(path: Path | None) -> Any:
    """The Qwen3-4B CLIP (type lumina2) from a text_encoders file or a checked diffusers text_encoder/."""
    if path is None:
        return None
    import comfy.sd

    embeddings = folder_paths.get_folder_paths("embeddings")
    if path.is_file():
        return comfy.sd.load_clip(ckpt_paths=[str(path)], embedding_directory=embeddings,
                                  clip_type=comfy.sd.CLIPType.LUMINA2)
    # transformers' Qwen3Model keys lack ComfyUI's "model." prefix (Qwen3ForCausalLM's have it).
    sd = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v
          for k, v in _merged_weights(path, "model").items()}
    return comfy.sd.load_text_encoder_state_dicts([sd], embedding_directory=embeddings,
                                                  clip_type=comfy.sd.CLIPType.LUMINA2)


def load_vae(path: Path | None) -> Any:
    """The 16-channel Flux VAE from a vae file or a diffusers vae/ folder."""
    if path is None:
        return None
    import comfy.sd
    import comfy.utils

    from ..trainer.model import ModelLoadError

    if path.is_file():
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    else:
        sd, metadata = _merged_weights(path, "diffusion_pytorch_model"), None
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    vae.throw_exception_if_invalid()
    if vae.latent_channels != VAE_CHANNELS:
        raise ModelLoadError(f"{path.name}: this VAE has {vae.latent_channels} latent channels; Z-Image "
                             "needs the 16-channel Flux VAE (ae.safetensors)")
    if path.is_file():
        vae.patcher.cached_patcher_init = (comfy.sd.load_vae_patcher, (str(path), metadata, None))
    return vae


class ZITLoadModel(io.ComfyNode):
    """Load the ZIT diffusion model (file or diffusers folder) and optionally its text encoder and VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITLoadModel",
            display_name="Load ZIT (Z-Image-Turbo)",
            category=CATEGORY,
            description=(
                "Loads the Z-Image-Turbo diffusion model from a diffusion_models file "
                "(z_image_turbo_bf16.safetensors) or a diffusers folder (names ending in '/'; its "
                "transformer shards are merged on load), and optionally the Qwen3-4B text encoder and the "
                "Flux VAE from their folders or the same diffusers folder. Refuses what is not the Z-Image "
                "transformer (a LoRA, Flux, a VAE...) and GGUF/Nunchaku files (the trainer cannot use "
                "them; load those with 'Load Diffusion Model'); ComfyUI's fp8/int8 files load. The MODEL "
                "remembers its source, so the ZIT trainer can reload a fresh copy."),
            inputs=[
                io.Combo.Input("model_name", options=model_choices(), tooltip=(
                    "A Z-Image-Turbo diffusion model: a file in models/diffusion_models, or a diffusers "
                    "folder (name ending in '/') in models/diffusers or models/diffusion_models.")),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="default", tooltip=(
                    "Precision of the weights in memory; default = ComfyUI's choice for this device "
                    "(bf16 on most GPUs, fp32 on the CPU).")),
                io.Combo.Input("clip_name", options=[NONE, FROM_DIFFUSERS, *_files("text_encoders")],
                               default=NONE, optional=True, tooltip=(
                    "The Qwen3-4B text encoder (qwen_3_4b.safetensors, loaded as type lumina2) from "
                    "models/text_encoders, the diffusers folder's text_encoder/, or none.")),
                io.Combo.Input("vae_name", options=[NONE, FROM_DIFFUSERS, *_files("vae")],
                               default=NONE, optional=True, tooltip=(
                    "The 16-channel Flux VAE (ae.safetensors) from models/vae, the diffusers folder's "
                    "vae/, or none.")),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The Z-Image-Turbo diffusion model."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder (None if clip_name is none)."),
                io.Vae.Output(display_name="VAE", tooltip="The VAE (None if vae_name is none)."),
            ],
            search_aliases=["z-image loader", "zit loader", "load z-image-turbo", "diffusers z-image"],
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str = "default", clip_name: str = NONE,
                vae_name: str = NONE) -> io.NodeOutput:
        source = _resolve_model(model_name)
        # Resolve and check the text encoder and VAE first: fail before the long model load.
        clip = _part_path(clip_name, source, "text_encoders", "text_encoder", "text encoder")
        if clip is not None and clip.is_dir():
            _check_text_encoder_config(clip)
        vae = _part_path(vae_name, source, "vae", "vae", "VAE")
        model = load_zit_model(source, _model_options(weight_dtype))
        return io.NodeOutput(model, load_clip(clip), load_vae(vae))

"""Load Z-Image-Turbo's transformer, text encoder and VAE offline, and put peft LoRAs on the transformer."""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from .errors import ZitError
from .lora.canonical import Lora, LoraError, LoraModule
from .lora.spec import ZIT, ZitSpec, diffusers_name

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
    header.pop("__metadata__", None)
    return {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}


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


def _refuse_non_zit(name: str, infos: dict[str, TensorInfo], trainable: bool = True) -> None:
    """Raise ModelLoadError unless the header is a Z-Image transformer (unquantized, when `trainable`)."""
    reason = _quantization(infos)
    if reason and (trainable or "Nunchaku" in reason):  # ComfyUI samples fp8 files; nobody reads Nunchaku
        raise ModelLoadError(f"{name}: {reason}")
    keys = {_strip_prefix(k) for k in infos}
    if not any(re.fullmatch(r"layers\.\d+\.attention\.(qkv|to_q)\.weight", k) for k in keys):
        raise ModelLoadError(f"{name}: {_looks_like(keys)}")
    embed_keys = ("x_embedder.weight", "all_x_embedder.2-1.weight")
    embeds = [infos[k] for k in infos if _strip_prefix(k) in embed_keys]
    if embeds and embeds[0].shape[0] == 2304:
        raise ModelLoadError(f"{name}: a NextDiT with dim 2304: this is Lumina 2, not Z-Image")


# ----------------------------------------------------------------------------------------------------
# ComfyUI fused layout <-> diffusers layout, per tensor
# (mirrors diffusers' convert_z_image_transformer_checkpoint_to_diffusers)
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Transformer config and construction
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Transformer loading
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------

QWEN3_4B: dict = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


@dataclass
class TextEncoder:
    """Qwen3 + its tokenizer, encoding prompts the way ZImagePipeline does."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 512

    def chat_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as one user turn of the chat template, generation prompt added, thinking enabled."""
        return [
            self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True)
            for p in prompts
        ]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Second-to-last hidden states of each templated prompt, padding trimmed: a list of (L_i, hidden)."""
        inputs = self.tokenizer(self.chat_prompts(prompts), padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        device = self.model.device
        ids = inputs.input_ids.to(device)
        mask = inputs.attention_mask.to(device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [h[m] for h, m in zip(hidden, mask, strict=True)]


def qwen3_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> Qwen3Config:
    """A Qwen3Config from Qwen3Model weight shapes (names without prefix); other settings are Qwen3-4B's."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    return Qwen3Config(**{
        **QWEN3_4B,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "num_hidden_layers": _max_index(shapes, "layers"),
        "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0],
    })


def _qwen_prefix(path: Path, infos: dict[str, TensorInfo]) -> str:
    reason = _quantization(infos, _TE_HINT)
    if reason:
        raise ModelLoadError(f"{path.name}: {reason}")
    embed = [k for k in infos if k.endswith("embed_tokens.weight")]
    if not embed or not any(k.endswith("self_attn.q_norm.weight") for k in infos):
        raise ModelLoadError(f"{path.name}: not a Qwen3 text encoder; {_looks_like(set(infos))}")
    return embed[0][: -len("embed_tokens.weight")]


def _load_qwen_file(path: Path, dtype: torch.dtype, device: torch.device | str) -> Qwen3Model:
    """A Qwen3Model from a single safetensors file (ComfyUI `qwen_3_4b.safetensors` style), built on meta."""
    infos = read_header(path)
    prefix = _qwen_prefix(path, infos)
    shapes = {k[len(prefix):]: v.shape for k, v in infos.items() if k.startswith(prefix)}
    config = qwen3_config_from_shapes(shapes)
    with torch.device("meta"):
        model = Qwen3Model(config)
    _check_shapes(model, shapes, path.name)
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                tensors[key[len(prefix):]] = f.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rotary_emb = Qwen3RotaryEmbedding(config).to(device)
    return model


def _text_encoder_folders(path: Path) -> tuple[Path, Path]:
    """(text_encoder folder, tokenizer folder) of a diffusers root or of its text_encoder/ subfolder."""
    if (path / "text_encoder" / "config.json").is_file():
        return path / "text_encoder", path / "tokenizer"
    if (path / "config.json").is_file():
        return path, path.parent / "tokenizer"
    raise ModelLoadError(f"{path}: expected a diffusers folder with text_encoder/ and tokenizer/ subfolders")


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: tokenizer folder not found")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_text_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    tokenizer: PathLike | None = None,
) -> TextEncoder:
    """Load Qwen3 + tokenizer offline from a diffusers folder, or a single file plus a `tokenizer` folder."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_file():
        if tokenizer is None:
            raise ModelLoadError(f"{path.name}: a single-file text encoder needs a tokenizer folder")
        model = _load_qwen_file(path, dtype, device)
        tok_folder = Path(tokenizer)
    else:
        te_folder, tok_folder = _text_encoder_folders(path)
        if json.loads((te_folder / "config.json").read_text()).get("model_type") != "qwen3":
            raise ModelLoadError(f"{te_folder}: not a Qwen3 text encoder")
        model = Qwen3Model.from_pretrained(str(te_folder), dtype=dtype, local_files_only=True).to(device)
        tok_folder = Path(tokenizer) if tokenizer is not None else tok_folder
    return TextEncoder(model.requires_grad_(False).eval(), _load_tokenizer(tok_folder))


# ----------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# LoRA with peft
# ----------------------------------------------------------------------------------------------------

_ATTN = r"attention\.(?:to_q|to_k|to_v|to_out\.0)"
_FFN = r"feed_forward\.w[123]"
# Full-name regexes (re.fullmatch against model.named_modules()); never suffixes.
TARGET_PRESETS: dict[str, str] = {
    "aitoolkit": rf"layers\.\d+\.(?:{_ATTN}|{_FFN}|adaLN_modulation\.0)",
    "diffsynth": rf"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:{_ATTN}|{_FFN})",
    "attention": rf"layers\.\d+\.{_ATTN}",
}


@dataclass
class _AdapterState:
    trainable: bool
    enabled: bool = True
    strength: float = 1.0


def _adapters(model: nn.Module) -> dict[str, _AdapterState]:
    if not hasattr(model, "_zit_adapters"):
        model._zit_adapters = {}
    return model._zit_adapters


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def _base_linear(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def resolve_targets(model: ZImageTransformer2DModel, targets: str) -> list[str]:
    """Full names of the Linear modules selected by a preset name or a full-name regex, in model order."""
    pattern = TARGET_PRESETS.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise LoraError(f"LoRA targets {pattern!r}: invalid regex ({e})") from e
    known = {diffusers_name(k) for k in model_spec(model).module_keys()}
    matched = [(n, m) for n, m in model.named_modules() if regex.fullmatch(n)]
    names = [n for n, m in matched if n in known and isinstance(_base_linear(m), nn.Linear)]
    if not names:
        other = _names([f"{n} ({type(m).__name__})" for n, m in matched])
        raise LoraError(f"LoRA targets {targets!r} select no Linear module of the transformer"
                        + (f"; they match only {other}" if other else ""))
    return names


def _exact(names: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _adapter_params(layer: LoraLayer, name: str) -> Iterator[nn.Parameter]:
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr)
        if name in holder:
            item = holder[name]
            yield from [item] if isinstance(item, nn.Parameter) else item.parameters()


def _apply_adapter_state(model: nn.Module) -> None:
    """Activate the enabled adapters on every LoRA layer, set strengths, freeze all but trainable adapters."""
    states = _adapters(model)
    active = [n for n, s in states.items() if s.enabled]
    for _, layer in _lora_layers(model):
        layer.set_adapter(active)
        for name, state in states.items():
            layer.set_scale(name, state.strength)
            for p in _adapter_params(layer, name):
                p.requires_grad_(state.trainable)


def _add_adapter(model: nn.Module, config: LoraConfig, name: str, state: _AdapterState) -> None:
    if name in _adapters(model):
        raise LoraError(f"the model already has an adapter named {name!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
        model.add_adapter(config, adapter_name=name)
    _adapters(model)[name] = state
    _apply_adapter_state(model)


def inject_lora(
    model: ZImageTransformer2DModel,
    rank: int,
    alpha: float,
    targets: str = "aitoolkit",
    init: Literal["default", "gaussian"] = "default",
    adapter_name: str = "zit",
) -> list[str]:
    """Add a trainable peft LoRA (B zero-initialised, so no change at step 0); returns the targeted names."""
    if init not in ("default", "gaussian"):
        raise LoraError(f"LoRA init {init!r}: expected 'default' or 'gaussian'")
    names = resolve_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=_exact(names),
                        init_lora_weights=True if init == "default" else "gaussian")
    _add_adapter(model, config, adapter_name, _AdapterState(trainable=True))
    return names


def _configured_scale(layer: LoraLayer, name: str) -> float:
    r = layer.r[name]
    return layer.lora_alpha[name] / (math.sqrt(r) if layer.use_rslora.get(name, False) else r)


def lora_from_peft(
    model: ZImageTransformer2DModel, adapter_name: str = "zit", spec: ZitSpec | None = None
) -> Lora:
    """The canonical float32 Lora of one peft adapter (alpha/r folded into B; strength not applied)."""
    spec = spec or model_spec(model)
    keys = {diffusers_name(k): k for k in spec.module_keys()}
    modules = {}
    for name, layer in _lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if name not in keys:
            raise LoraError(f"adapter {adapter_name!r} is on {name}, which is not a Z-Image LoRA module")
        a = layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32, copy=True)
        b = layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32, copy=True)
        modules[keys[name]] = LoraModule(a, b * _configured_scale(layer, adapter_name))
    if not modules:
        raise LoraError(f"the model has no LoRA adapter named {adapter_name!r}")
    return Lora(modules, {}, spec)


def _check_fits(model: nn.Module, lora: Lora) -> dict[str, LoraModule]:
    """The lora's modules by diffusers name, after checking each exists in the model with matching shape."""
    by_name = {}
    for key, module in lora.modules.items():
        name = diffusers_name(key)
        try:
            linear = _base_linear(model.get_submodule(name))
        except AttributeError:
            raise LoraError(f"LoRA module {name} does not exist in this transformer") from None
        if tuple(linear.weight.shape) != (module.b.shape[0], module.a.shape[1]):
            out_f, in_f = linear.weight.shape
            raise LoraError(f"LoRA module {name}: dW is {module.b.shape[0]}x{module.a.shape[1]} but the "
                            f"weight is {out_f}x{in_f}")
        by_name[name] = module
    return by_name


def load_lora_into_peft(
    model: ZImageTransformer2DModel, lora: Lora, adapter_name: str, trainable: bool, strength: float = 1.0
) -> None:
    """Add a canonical Lora as a peft adapter (scale 1, per-module ranks), active at `strength`."""
    by_name = _check_fits(model, lora)
    if not by_name:
        raise LoraError(f"LoRA for adapter {adapter_name!r} has no modules")
    ranks = {n: m.rank for n, m in by_name.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(n): r for n, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=_exact(by_name), rank_pattern=odd,
                        alpha_pattern=odd, init_lora_weights=False)
    _add_adapter(model, config, adapter_name, _AdapterState(trainable=trainable, strength=strength))
    with torch.no_grad():
        for name, module in by_name.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(module.a)
            layer.lora_B[adapter_name].weight.copy_(module.b)


def attach_frozen_adapter(
    model: ZImageTransformer2DModel, lora: Lora, strength: float = 1.0, name: str = "adapter"
) -> None:
    """Stack a frozen adapter (e.g. the ZIT training adapter) under the trainable LoRA, active together."""
    load_lora_into_peft(model, lora, name, trainable=False, strength=strength)


def set_adapter_enabled(model: ZImageTransformer2DModel, name: str, enabled: bool) -> None:
    """Turn one adapter on or off, leaving the others as they are."""
    states = _adapters(model)
    if name not in states:
        raise LoraError(f"the model has no adapter named {name!r}")
    states[name].enabled = enabled
    _apply_adapter_state(model)


@contextmanager
def adapters_disabled(model: ZImageTransformer2DModel, names: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block the named adapters (default: all, i.e. the frozen base) are off; restored after."""
    states = _adapters(model)
    names = list(states) if names is None else list(names)
    unknown = [n for n in names if n not in states]
    if unknown:
        raise LoraError(f"the model has no adapter named {unknown[0]!r}")
    was = {n: states[n].enabled for n in names}
    for n in names:
        states[n].enabled = False
    _apply_adapter_state(model)
    try:
        yield
    finally:
        for n, enabled in was.items():
            states[n].enabled = enabled
        _apply_adapter_state(model)


def adapter_disabled(model: ZImageTransformer2DModel, name: str = "adapter") -> AbstractContextManager[None]:
    """Within the block adapter `name` is off (previews = base + trained LoRA); restored afterwards."""
    return adapters_disabled(model, [name])

"""A tiny seeded Z-Image stack (real diffusers/transformers classes, toy sizes) for tests and the CPU demo."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from .lora.spec import ZitSpec
from .model import FLUX_VAE, QWEN3_4B, TextEncoder, Vae, build_transformer, to_comfy_state_dict
from .model.headers import ModelLoadError, _check_shapes

# Real structure (2 noise + 2 context refiners, adaLN, 16 latent channels, patch 2), toy widths.
TINY_SPEC = ZitSpec(dim=64, n_layers=3, n_refiner_layers=2, n_heads=4, cap_feat_dim=32, in_channels=16)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template, reduced to what ZIT uses: user/assistant/system turns and the enable_thinking switch.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

TINY_VAE: dict = {**FLUX_VAE, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 8, "sample_size": 64}
TINY_VAE_FILE = Path(__file__).resolve().parent / "assets" / "tiny_vae.safetensors"
"""TINY_VAE trained by scripts/train_tiny_vae.py (fp16): tiny_vae(0) really reconstructs pictures."""


def tiny_qwen_config(vocab_size: int) -> Qwen3Config:
    """A 2-layer Qwen3 whose hidden size is the tiny transformer's cap_feat_dim."""
    return Qwen3Config(**{
        **QWEN3_4B,
        "vocab_size": vocab_size,
        "hidden_size": TINY_SPEC.cap_feat_dim,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    })


def _randomize_constants(model: nn.Module, gen: torch.Generator) -> None:
    """Give constant-initialised parameters (norm weights, pad tokens, zero biases) seeded random values."""
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().flatten()
            if flat.numel() and bool((flat == flat[0]).all()):
                p.copy_(flat[0] + 0.1 * torch.randn(p.shape, generator=gen))


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    _randomize_constants(model, torch.Generator().manual_seed(seed + 1))
    return model.requires_grad_(False).eval()


def tiny_transformer(seed: int = 0) -> ZImageTransformer2DModel:
    """The tiny transformer (TINY_SPEC), float32, deterministic per seed."""
    return _seeded(lambda: build_transformer(TINY_SPEC, device="cpu"), seed)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer with Qwen's chat special tokens and a Qwen3-style chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, padding_side="right", model_max_length=32768)


def tiny_text_encoder(seed: int = 0) -> TextEncoder:
    """The tiny Qwen3 text encoder with its tokenizer, float32, deterministic per seed."""
    tokenizer = tiny_tokenizer()
    model = _seeded(lambda: Qwen3Model(tiny_qwen_config(len(tokenizer))), seed)
    return TextEncoder(model, tokenizer)


def trained_tiny_vae(path: Path = TINY_VAE_FILE) -> AutoencoderKL:
    """The TINY_VAE autoencoder with the trained weights of `path` (fp16 on disk), float32, eval."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: the tiny VAE's weights are missing (run scripts/train_tiny_vae.py)")
    with torch.device("meta"):
        model = AutoencoderKL.from_config(TINY_VAE)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    _check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, path.name)
    model.load_state_dict(state, assign=True)
    return model.requires_grad_(False).eval()


def tiny_vae(seed: int = 0) -> Vae:
    """The tiny Flux-structured VAE (16 latent channels, 8x down, ZIT scale/shift), float32: seed 0 is the
    trained one (trained_tiny_vae: it really reconstructs pictures), other seeds random but deterministic."""
    if seed == 0:
        return Vae(trained_tiny_vae())
    return Vae(_seeded(lambda: AutoencoderKL.from_config(TINY_VAE), seed))


def _decoder_up(n_blocks: int):
    return lambda m: f"decoder.up.{n_blocks - 1 - int(m.group(1))}."


# diffusers AutoencoderKL name -> BFL/LDM name, applied in order (the inverse of convert_ldm_vae_checkpoint).
_BFL_RENAMES = (
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1."),
    (r"\.(down|up)\.(\d+)\.resnets\.", r".\1.\2.block."),
    (r"\.downsamplers\.0\.", ".downsample."),
    (r"\.upsamplers\.0\.", ".upsample."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.attn_1\.group_norm\.", ".attn_1.norm."),
    (r"\.attn_1\.to_([qkv])\.", r".attn_1.\1."),
    (r"\.attn_1\.to_out\.0\.", ".attn_1.proj_out."),
)


def vae_to_bfl(state_dict: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in BFL `ae.safetensors` layout (attention as 1x1 convs)."""
    out = {}
    for key, tensor in state_dict.items():
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.", _decoder_up(n_blocks), key)
        for pattern, repl in _BFL_RENAMES:
            new = re.sub(pattern, repl, new)
        if ".attn_1." in new and new.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[new] = tensor.contiguous()
    return out


@dataclass(frozen=True)
class TinyCheckpoints:
    """Where save_tiny_checkpoints wrote each file."""

    transformer_file: Path  # ComfyUI single file, fused qkv, no prefix
    text_encoder_file: Path  # ComfyUI-style single Qwen3 file ("model." prefix)
    vae_file: Path  # BFL ae.safetensors layout
    diffusers_dir: Path  # model_index.json + transformer/ (sharded) text_encoder/ tokenizer/ vae/ scheduler/


def tiny_pipeline(seed: int = 0) -> ZImagePipeline:
    """A ZImagePipeline assembled from the tiny models (ZIT's shift-3 Euler scheduler)."""
    te = tiny_text_encoder(seed)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(scheduler=scheduler, vae=tiny_vae(seed).model, text_encoder=te.model,
                          tokenizer=te.tokenizer, transformer=tiny_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_checkpoints(directory: str | Path, seed: int = 0) -> TinyCheckpoints:
    """Write the tiny models (fp32) in the layouts the loaders read: single files and a diffusers folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline(seed)
    paths = TinyCheckpoints(
        transformer_file=directory / "z_image_turbo_tiny.safetensors",
        text_encoder_file=directory / "qwen_3_tiny.safetensors",
        vae_file=directory / "ae_tiny.safetensors",
        diffusers_dir=directory / "diffusers",
    )
    save_file(to_comfy_state_dict(pipe.transformer.state_dict()), paths.transformer_file)
    save_file({f"model.{k}": v.contiguous() for k, v in pipe.text_encoder.state_dict().items()},
              paths.text_encoder_file)
    save_file(vae_to_bfl(pipe.vae.state_dict(), len(TINY_VAE["block_out_channels"])), paths.vae_file)
    pipe.save_pretrained(paths.diffusers_dir, max_shard_size="1MB")
    return paths

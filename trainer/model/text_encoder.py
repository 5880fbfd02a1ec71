"""The Qwen3 text encoder and its tokenizer, loaded offline, encoding prompts as ZImagePipeline does."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from .headers import (
    _TE_HINT,
    ModelLoadError,
    PathLike,
    TensorInfo,
    _check_shapes,
    _looks_like,
    _max_index,
    _quantization,
    read_header,
)

log = logging.getLogger(__name__)

ZIT_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
"""A prompt as ZImagePipeline gives it to Qwen3: one user turn and the assistant's opening (what Qwen3's chat
template renders with enable_thinking; ComfyUI's Z-Image text encoder writes the same turn)."""
COMFYUI_TOKENIZER = ("comfy", "text_encoders", "qwen25_tokenizer")
"""Where a ComfyUI checkout keeps the Qwen tokenizer its Z-Image text encoder uses (Qwen3's vocabulary)."""
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

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
    template: str | None = None  # ZIT_PROMPT for a tokenizer whose own chat template renders another turn

    def chat_prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt as one user turn of the chat template, generation prompt added, thinking enabled."""
        if self.template is not None:
            return [self.template.format(p) for p in prompts]
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


def comfyui_tokenizer(checkout: PathLike) -> Path:
    """The Qwen tokenizer folder of a ComfyUI checkout (or of a portable install's folder holding ComfyUI/);
    ModelLoadError naming the checkout and the files looked for when it has none."""
    root = Path(checkout).expanduser()
    for base in (root, root / "ComfyUI"):
        folder = base.joinpath(*COMFYUI_TOKENIZER)
        if all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in TOKENIZER_FILES):
            return folder
    raise ModelLoadError(f"{root}: not a ComfyUI checkout with its Qwen tokenizer (looked for "
                         f"{'/'.join(COMFYUI_TOKENIZER)}/ with {', '.join(TOKENIZER_FILES)})")


def prompt_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """None when the tokenizer's chat template renders a prompt as ZIT_PROMPT does (Qwen3's, with thinking);
    else ZIT_PROMPT, e.g. for ComfyUI's Qwen2.5 tokenizer, whose template adds a default system turn."""
    probe = "a photo of a fox"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=True)
    except Exception:  # noqa: BLE001 - no chat template, or one that fails: the fixed turn is ZIT's anyway
        rendered = None
    return None if rendered == ZIT_PROMPT.format(probe) else ZIT_PROMPT


def load_text_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    tokenizer: PathLike | None = None,
) -> TextEncoder:
    """Load Qwen3 + tokenizer offline from a diffusers folder, or a single file plus a `tokenizer` folder
    (a diffusers tokenizer/ or a ComfyUI checkout's, see `comfyui_tokenizer`). Prompts are templated as
    ZImagePipeline does whatever chat template the tokenizer folder carries (`prompt_template`)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_file():
        if tokenizer is None:
            raise ModelLoadError(f"{path.name}: a single-file text encoder needs a tokenizer folder: put one "
                                 "named tokenizer beside it, or give a ComfyUI checkout (--comfyui PATH or "
                                 "COMFYUI_PATH) to use its Qwen tokenizer")
        model = _load_qwen_file(path, dtype, device)
        tok_folder = Path(tokenizer)
    else:
        te_folder, tok_folder = _text_encoder_folders(path)
        if json.loads((te_folder / "config.json").read_text()).get("model_type") != "qwen3":
            raise ModelLoadError(f"{te_folder}: not a Qwen3 text encoder")
        model = Qwen3Model.from_pretrained(str(te_folder), dtype=dtype, local_files_only=True).to(device)
        tok_folder = Path(tokenizer) if tokenizer is not None else tok_folder
    tok = _load_tokenizer(tok_folder)
    template = prompt_template(tok)
    if template is not None:
        log.info("%s: its chat template does not render ZIT's prompt turn; using the fixed turn", tok_folder)
    return TextEncoder(model.requires_grad_(False).eval(), tok, template=template)




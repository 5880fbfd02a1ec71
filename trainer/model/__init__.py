"""Z-Image models, loaded offline: checkpoint headers and key conversion, the transformer, the text encoder,
the VAE and the peft adapters on the transformer; quantized storage and block swap for low-VRAM training.

Callers import from `trainer.model`; each concern lives in its own module below.
"""

from .adapters import (
    TARGET_PRESETS,
    adapter_disabled,
    adapters_disabled,
    attach_frozen_adapter,
    inject_lora,
    load_lora_into_peft,
    lora_from_peft,
    resolve_targets,
    set_adapter_enabled,
)
from .checkpoint_quant import QuantLayout, quant_layout
from .headers import ModelLoadError, TensorInfo, read_header, read_header_and_metadata, weight_files
from .keys import diffusers_keys, to_comfy_state_dict
from .quantize import QUANTIZED_MODULES, STORAGES, Fp8Linear, quantize_transformer
from .swap import BlockSwap, BlockSwapError
from .text_encoder import QWEN3_4B, TextEncoder, load_text_encoder, qwen3_config_from_shapes
from .transformer import (
    ZIT_AXES_LENS,
    build_transformer,
    checkpoint_spec,
    load_transformer,
    model_spec,
    predict_velocity,
    spec_from_shapes,
    transformer_checkpoint,
    transformer_config,
)
from .vae import FLUX_VAE, Vae, load_vae, vae_config_from_bfl

__all__ = [
    "BlockSwap", "BlockSwapError", "FLUX_VAE", "Fp8Linear", "ModelLoadError", "QUANTIZED_MODULES",
    "QWEN3_4B", "QuantLayout", "STORAGES", "TARGET_PRESETS", "TensorInfo", "TextEncoder", "Vae",
    "ZIT_AXES_LENS", "adapter_disabled", "adapters_disabled", "attach_frozen_adapter", "build_transformer",
    "checkpoint_spec", "diffusers_keys", "inject_lora", "load_lora_into_peft", "load_text_encoder",
    "load_transformer", "load_vae", "lora_from_peft", "model_spec", "predict_velocity", "quant_layout",
    "quantize_transformer", "qwen3_config_from_shapes", "read_header", "read_header_and_metadata",
    "resolve_targets", "set_adapter_enabled", "spec_from_shapes", "to_comfy_state_dict",
    "transformer_checkpoint", "transformer_config", "vae_config_from_bfl", "weight_files",
]

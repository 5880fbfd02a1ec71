"""Quantized checkpoint layouts as ComfyUI writes them: what a file holds, read from its header before
anything loads, and its stored weights decoded as `W = q.float() * scale`.

Layouts (ComfyUI's comfy/utils.py `convert_old_quants` and comfy/ops.py `_load_quantized_module`):
- plain fp8: float8 weights with no scale tensors (scale 1);
- old scaled fp8: a `scaled_fp8` marker tensor and per layer `<layer>.scale_weight` (per-tensor float32 scale)
  and maybe `<layer>.scale_input` (an activation scale: not needed to decode the weight);
- comfy_quant: the metadata key `_quantization_metadata` = {"layers": {"<layer>": {"format": ...}}} and/or a
  `<layer>.comfy_quant` uint8 tensor holding that layer's JSON, with `<layer>.weight_scale` (and maybe
  `.input_scale`). The metadata wins over the tensors, as in ComfyUI.
Decoded formats: float8_e4m3fn, float8_e5m2, int8_tensorwise (per-tensor or per-row scale). Block formats
(nvfp4, mxfp8), rotated ones (convrot), GGUF, Nunchaku and bitsandbytes files are refused by name.
Layers without an entry hold their weight in a plain dtype (an fp8 weight there is decoded with scale 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .headers import _BF16_HINT, ModelLoadError, TensorInfo, _strip_prefix, read_header_and_metadata
from .quantize import quantize_fp8

DECODABLE = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int8_tensorwise": "I8"}
"""Formats we decode, with the safetensors dtype their weight must have."""
_FP8_FORMATS = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_HINT = f'{_BF16_HINT}, or an fp8 (float8_e4m3fn) one; model.memory = "fp8" keeps it in fp8'
_METADATA = "_quantization_metadata"
_AUX_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")


@dataclass(frozen=True)
class LayerQuant:
    """How one weight is stored: its format and the key of its scale (None = scale 1)."""

    format: str
    scale_key: str | None = None


@dataclass(frozen=True)
class QuantLayout:
    """What a checkpoint holds: kind "unquantized", "fp8" (plain), "scaled_fp8" or "comfy_quant".

    `weights` maps each quantized weight's key to its LayerQuant; `aux_keys` are the scale, marker and
    comfy_quant tensors, which are not model weights.
    """

    kind: str
    formats: frozenset[str] = frozenset()
    weights: Mapping[str, LayerQuant] = field(default_factory=dict)
    aux_keys: frozenset[str] = frozenset()

    def model_infos(self, infos: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The header entries that are model weights (scales, markers and comfy_quant tensors left out)."""
        return {k: v for k, v in infos.items() if k not in self.aux_keys}


def _refuse(name: str, fmt: str, layer: str, why: str = "cannot be decoded for training") -> ModelLoadError:
    return ModelLoadError(f"{name}: {fmt} quantization (first at {layer}) {why}; {_HINT}")


def aux_keys(infos: Mapping[str, TensorInfo]) -> frozenset[str]:
    """Quantization bookkeeping keys (scales, the scaled_fp8 marker, comfy_quant), from names alone."""
    return frozenset(k for k in infos if k.endswith(_AUX_SUFFIXES) or _strip_prefix(k) == "scaled_fp8")


def refuse_foreign_quantization(name: str, infos: Mapping[str, TensorInfo]) -> None:
    """Refuse Nunchaku, GPTQ/AWQ and bitsandbytes-saved checkpoints, which nothing here (or ComfyUI) reads."""
    for key in infos:
        if key.endswith("qweight") or ".w13." in key:
            raise ModelLoadError(f"{name}: a Nunchaku/GPTQ-quantized model (qweight, at {key}): not "
                                 f"supported for training; {_BF16_HINT}")
        if key.endswith((".absmax", ".quant_map", ".SCB")) or ".quant_state." in key:
            raise ModelLoadError(f"{name}: a bitsandbytes-saved model (at {key}): not supported for "
                                 f'training; {_BF16_HINT} (model.memory = "nf4" quantizes it while loading)')


def _format_of(conf: object) -> str:
    if isinstance(conf, str):
        return conf
    if isinstance(conf, dict):
        return str(conf.get("format") or "a format-less")
    return "an unreadable"


def metadata_layers(name: str, metadata: Mapping[str, str]) -> dict[str, object]:
    """The per-layer configs of a `_quantization_metadata` entry ({} without one), layer names unprefixed."""
    if _METADATA not in metadata:
        return {}
    try:
        layers = json.loads(metadata[_METADATA])["layers"]
        if not isinstance(layers, dict):
            raise TypeError("layers is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{name}: unreadable {_METADATA} metadata ({e}); {_HINT}") from e
    return {_strip_prefix(k): v for k, v in layers.items()}


def read_layer_configs(path: Path, infos: Mapping[str, TensorInfo]) -> dict[str, object]:
    """The JSON of each `<layer>.comfy_quant` tensor of a file (small uint8 tensors), by unprefixed layer."""
    keys = [k for k in infos if k.endswith(".comfy_quant")]
    if not keys:
        return {}
    configs = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            raws = {k: f.get_tensor(k).to(torch.uint8).numpy().tobytes() for k in keys}
    except SafetensorError as e:
        raise ModelLoadError(f"{path.name}: cannot read its comfy_quant tensors ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
    for key, raw in raws.items():
        try:
            conf = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            conf = None
        configs[_strip_prefix(key)[: -len(".comfy_quant")]] = conf
    return configs


def _numel(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n


def _scale_fits(info: TensorInfo | None, weight: TensorInfo) -> bool:
    if info is None:
        return True
    n = _numel(info)
    return n == 1 or (bool(weight.shape) and n == weight.shape[0])


def _comfy_layer(name: str, layer: str, conf: object, infos: Mapping[str, TensorInfo],
                 by_stripped: Mapping[str, str]) -> tuple[str, LayerQuant] | None:
    fmt = _format_of(conf)
    if fmt not in DECODABLE:
        raise _refuse(name, fmt, layer)
    if isinstance(conf, dict) and (conf.get("convrot") or (conf.get("params") or {}).get("convrot")):
        raise _refuse(name, f"{fmt} with convrot (rotated weights)", layer)
    weight_key = by_stripped.get(f"{layer}.weight")
    if weight_key is None:
        return None  # metadata for a layer this file does not hold: nothing to decode
    weight = infos[weight_key]
    if weight.dtype != DECODABLE[fmt]:
        raise _refuse(name, fmt, layer, f"has a {weight.dtype} weight (expected {DECODABLE[fmt]})")
    scale_key = by_stripped.get(f"{layer}.weight_scale")
    if scale_key is None and fmt == "int8_tensorwise":
        raise _refuse(name, fmt, layer, "has no weight_scale")
    if not _scale_fits(infos.get(scale_key), weight):
        raise _refuse(name, fmt, layer, f"has a weight_scale of shape {list(infos[scale_key].shape)} "
                                        "(expected one value or one per row)")
    return weight_key, LayerQuant(fmt, scale_key)


def _header_formats(name: str, infos: Mapping[str, TensorInfo]) -> None:
    """Block formats told by the header alone (for files whose format names we cannot read)."""
    for key, info in infos.items():
        if key.endswith(".weight_scale_2"):
            raise _refuse(name, "nvfp4", key[: -len(".weight_scale_2")])
        if info.dtype in ("F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"):
            raise _refuse(name, "mxfp8" if info.dtype == "F8_E8M0" else info.dtype, key.rpartition(".")[0])


def _scaled_fp8_layers(name: str, infos: Mapping[str, TensorInfo]) -> dict[str, LayerQuant]:
    """The old scaled-fp8 layout: each fp8 `<layer>.weight` with its per-tensor `<layer>.scale_weight`."""
    weights = {}
    for key in infos:
        if not key.endswith(".scale_weight"):
            continue
        layer = key[: -len(".scale_weight")]
        weight = infos.get(f"{layer}.weight")
        if weight is None or weight.dtype not in _FP8_FORMATS:
            continue  # ComfyUI ignores a scale without an fp8 weight too
        if _numel(infos[key]) != 1:
            shape = list(infos[key].shape)
            raise _refuse(name, "scaled fp8", layer, f"has a scale_weight of shape {shape} (expected one)")
        weights[f"{layer}.weight"] = LayerQuant(_FP8_FORMATS[weight.dtype], key)
    return weights


def quant_layout(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], name: str = "checkpoint",
                 layer_configs: Mapping[str, object] | None = None) -> QuantLayout:
    """What a checkpoint holds, from header, metadata and comfy_quant JSONs; refuses what we cannot decode.

    `layer_configs` are the `<layer>.comfy_quant` JSONs (read_layer_configs); the metadata's entries win.
    """
    refuse_foreign_quantization(name, infos)
    configs = {**(layer_configs or {}), **metadata_layers(name, metadata)}
    by_stripped = {_strip_prefix(k): k for k in infos}
    aux = aux_keys(infos)
    weights: dict[str, LayerQuant] = {}
    if configs:
        kind = "comfy_quant"
        for layer, conf in configs.items():
            found = _comfy_layer(name, layer, conf, infos, by_stripped)
            if found:
                weights[found[0]] = found[1]
    else:
        _header_formats(name, infos)
        scaled = "scaled_fp8" in by_stripped or any(k.endswith(".scale_weight") for k in infos)
        kind = "scaled_fp8" if scaled else "unquantized"
        weights.update(_scaled_fp8_layers(name, infos))
    for key, info in infos.items():
        if key in aux or key in weights:
            continue
        if info.dtype in _FP8_FORMATS:  # no format entry: its own weight_scale if it has one, else scale 1
            scale_key = f"{key[: -len('.weight')]}.weight_scale" if key.endswith(".weight") else None
            if scale_key not in infos or not _scale_fits(infos[scale_key], info):
                scale_key = None
            weights[key] = LayerQuant(_FP8_FORMATS[info.dtype], scale_key)
            kind = "fp8" if kind == "unquantized" else kind
        elif info.dtype in ("I8", "U8"):
            raise _refuse(name, f"{info.dtype} without a format", key.rpartition(".")[0])
    formats = frozenset(q.format for q in weights.values())
    return QuantLayout(kind, formats, weights, aux)


def checkpoint_layout(files: list[Path], name: str) -> tuple[dict[str, TensorInfo], QuantLayout]:
    """The merged header of a checkpoint's files and its QuantLayout; refuses what we cannot decode."""
    infos: dict[str, TensorInfo] = {}
    configs: dict[str, object] = {}
    layers: dict[str, object] = {}
    for f in files:
        file_infos, metadata = read_header_and_metadata(f)
        refuse_foreign_quantization(f.name, file_infos)
        infos.update(file_infos)
        layers.update(metadata_layers(f.name, metadata))
        configs.update(read_layer_configs(f, file_infos))
    metadata = {_METADATA: json.dumps({"layers": layers})} if layers else {}
    return infos, quant_layout(infos, metadata, name, configs)


# ----------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------


@dataclass
class StoredWeight:
    """A quantized weight as stored: `q` (fp8 or int8), float32 `scale` (0-dim, or (rows, 1)) and format."""

    q: torch.Tensor
    scale: torch.Tensor
    format: str

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """`q.float() * scale` (exact in float32), returned in `dtype`."""
        return (self.q.float() * self.scale).to(dtype)

    def split_rows(self, parts: int) -> list[StoredWeight]:
        """Equal row blocks (a fused qkv's q, k, v): a per-tensor scale is shared, a per-row one is split."""
        qs = self.q.chunk(parts, dim=0)
        scales = self.scale.chunk(parts, dim=0) if self.scale.ndim else [self.scale] * parts
        return [StoredWeight(q.clone(), s.clone(), self.format) for q, s in zip(qs, scales, strict=True)]

    def to(self, device: torch.device | str) -> StoredWeight:
        """The same weight on `device`."""
        return StoredWeight(self.q.to(device), self.scale.to(device), self.format)

    def as_fp8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp8 e4m3fn weight, float32 scale) for Fp8Linear: an e4m3fn weight is kept byte for byte with its
        scale; any other format is decoded and quantized per row."""
        if self.format == "float8_e4m3fn":
            return self.q, self.scale
        return quantize_fp8(self.dequantize(torch.float32))


def _scale_tensor(raw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    scale = raw.float()
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(-1, *([1] * (q.ndim - 1)))


def read_weights(files: list[Path], layout: QuantLayout) -> Iterator[tuple[str, torch.Tensor | StoredWeight]]:
    """Each model weight of a checkpoint, on the CPU, one at a time: a tensor, or a StoredWeight for quantized
    ones (scales read from whichever file holds them)."""
    with ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in files}
        where = {k: f for f, h in handles.items() for k in h.keys()}

        def get(key: str) -> torch.Tensor:
            try:
                return handles[where[key]].get_tensor(key)
            except SafetensorError as e:
                raise ModelLoadError(f"{where[key].name}: cannot read {key} ({e})") from e

        for key in where:
            if key in layout.aux_keys:
                continue
            tensor = get(key)
            quant = layout.weights.get(key)
            if quant is None:
                yield key, tensor
                continue
            scale = torch.ones(()) if quant.scale_key is None else _scale_tensor(get(quant.scale_key), tensor)
            yield key, StoredWeight(tensor, scale, quant.format)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise ModelLoadError(f"{path.name}: cannot read its tensors, truncated or corrupt ({e})") from e


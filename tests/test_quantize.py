"""Quantized ComfyUI checkpoints loaded: the fp8 / int8 layouts (plain fp8, scaled_fp8, comfy_quant with
header metadata or per-layer marker tensors) decode exactly, fp8 storage keeps e4m3fn bytes and requantizes
other formats per row, layers without a metadata entry stay plain, and block_device holds the main blocks.

The files are written by _quantize_helpers.write_quantized; refusals, an fp8 base under training and
bitsandbytes storage have their own test_quantize_*.py files.
"""

from __future__ import annotations

import json

import pytest
import torch
from _quantize_helpers import F32, Stored, quantize_per_tensor, write_quantized
from safetensors.torch import save_file
from torch import nn

from trainer import model as M
from trainer.model.checkpoint_quant import QuantLayout, checkpoint_layout, quant_layout
from trainer.model.headers import read_header_and_metadata
from trainer.model.keys import diffusers_keys
from trainer.model.quantize import FP8, QUANTIZED_MODULES, Fp8Linear
from trainer.tiny import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


def decoded(stored: Stored) -> Stored:
    """{diffusers weight name: (q part, scale)}: a fused qkv's rows split, its one scale kept for each."""
    out = {}
    for key, (q, scale) in stored.items():
        names = diffusers_keys(key)
        parts = q.chunk(3) if len(names) == 3 else [q]
        out.update({n: (p, scale) for n, p in zip(names, parts, strict=True)})
    return out


CASES = {  # name: (layout, format, write options, expected QuantLayout kind)
    "plain fp8": ("fp8", "float8_e4m3fn", {}, "fp8"),
    "scaled fp8": ("scaled_fp8", "float8_e4m3fn", {"prefix": "model.diffusion_model."}, "scaled_fp8"),
    "comfy_quant e4m3fn": ("comfy_quant", "float8_e4m3fn", {"prefix": "diffusion_model."}, "comfy_quant"),
    "comfy_quant e5m2 tensors": ("comfy_quant", "float8_e5m2", {"metadata": False, "markers": True},
                                 "comfy_quant"),
    "int8_tensorwise": ("comfy_quant", "int8_tensorwise", {"markers": True}, "comfy_quant"),
}


@pytest.mark.parametrize("case", CASES)
def test_quantized_layouts_decode_exactly_in_bf16_storage(tmp_path, source, case):
    layout, fmt, options, kind = CASES[case]
    path = tmp_path / "zit_quant.safetensors"
    stored = write_quantized(path, source, layout, fmt, **options)
    infos, found = checkpoint_layout([path], path.name)
    assert found.kind == kind and found.formats == {fmt}
    assert len(found.weights) == len(stored) == 5 * (TINY_SPEC.n_layers + 2 * TINY_SPEC.n_refiner_layers)
    model = M.load_transformer(path, dtype=F32)  # float32: `q.float() * scale` is representable exactly
    params = dict(model.named_parameters())
    expected = decoded(stored)
    for name, (q, scale) in expected.items():
        assert torch.equal(params[name], q.float() * scale), name
    for name, p in source.state_dict().items():  # every other weight is the source's
        if name not in expected:
            assert torch.equal(params[name], p), name
    assert all(type(model.get_submodule(n[: -len(".weight")])) is nn.Linear for n in expected)


@pytest.mark.parametrize("case", CASES)
def test_fp8_storage_keeps_e4m3fn_bytes_and_requantizes_the_rest_per_row(tmp_path, source, case):
    layout, fmt, options, _ = CASES[case]
    path = tmp_path / "zit_quant.safetensors"
    expected = decoded(write_quantized(path, source, layout, fmt, **options))
    model = M.load_transformer(path, dtype=torch.bfloat16, storage="fp8")
    for name, (q, scale) in expected.items():
        linear = model.get_submodule(name[: -len(".weight")])
        assert isinstance(linear, Fp8Linear) and linear.weight.dtype == FP8
        assert not linear.weight.requires_grad
        if fmt == "float8_e4m3fn":  # the file's bytes and its per-tensor scale, as stored
            assert torch.equal(linear.weight.view(torch.uint8), q.view(torch.uint8)), name
            assert linear.weight_scale.shape == (1, 1) and linear.weight_scale.item() == scale.item()
        else:  # decoded, then quantized per row: e4m3 rounding (2^-4 relative, 2^-10 * scale subnormal)
            assert linear.weight_scale.shape == (q.shape[0], 1)
            w = q.float() * scale
            err = (linear.dequantized_weight(F32) - w).abs()
            assert bool((err <= w.abs() * 2**-4 * 1.0001 + linear.weight_scale * 2**-10 * 1.0001).all()), name
    others = [n for n, m in model.named_modules() if type(m) is nn.Linear and QUANTIZED_MODULES.fullmatch(n)]
    assert others == []
    assert model.x_pad_token.dtype == model.layers[0].attention_norm1.weight.dtype == torch.bfloat16


def test_an_unquantized_file_in_fp8_storage_quantizes_per_row(tmp_path, source):
    path = tmp_path / "zit_bf16.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    infos, metadata = read_header_and_metadata(path)
    assert quant_layout(infos, metadata) == QuantLayout("unquantized", aux_keys=frozenset())
    model = M.load_transformer(path, dtype=F32, storage="fp8", block_device="cpu")
    names = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(names) == 7 * (TINY_SPEC.n_layers + 2 * TINY_SPEC.n_refiner_layers)
    q, scale = model.get_submodule(names[0]).weight, model.get_submodule(names[0]).weight_scale
    assert scale.shape == (q.shape[0], 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((q.shape[0],), 448.0))  # rows use the range


def test_header_metadata_is_read_and_layers_without_an_entry_stay_plain(tmp_path, source):
    path = tmp_path / "partial.safetensors"
    sd = M.to_comfy_state_dict(source.state_dict())
    q, scale = quantize_per_tensor(sd["layers.1.feed_forward.w2.weight"], "float8_e4m3fn")
    sd.update({"layers.1.feed_forward.w2.weight": q, "layers.1.feed_forward.w2.weight_scale": scale})
    layers = {"layers.1.feed_forward.w2": {"format": "float8_e4m3fn"},
              "layers.9.attention.qkv": "float8_e4m3fn"}  # a bare format string, as some converters write
    save_file(sd, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers}), "x": "y"})
    infos, metadata = read_header_and_metadata(path)
    assert metadata["x"] == "y" and M.read_header(path) == infos
    layout = quant_layout(infos, metadata, path.name)
    assert list(layout.weights) == ["layers.1.feed_forward.w2.weight"]  # layer 9 is not in the file: ignored
    model = M.load_transformer(path, dtype=F32)
    assert torch.equal(model.layers[1].feed_forward.w2.weight, q.float() * scale)
    assert torch.equal(model.layers[1].feed_forward.w1.weight, source.layers[1].feed_forward.w1.weight)


def test_block_device_holds_the_main_blocks(tmp_path, source):
    """`block_device` places layers.N.* there (here the meta device stands in for the CPU of a GPU run)."""
    path = tmp_path / "zit_scaled.safetensors"
    write_quantized(path, source, "comfy_quant", "float8_e4m3fn")
    model = M.load_transformer(path, dtype=F32, storage="fp8", block_device="meta")
    where = {n: t.device.type for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert where and all((d == "meta") == n.startswith("layers.") for n, d in where.items())
    assert isinstance(model.layers[0].attention.to_q, Fp8Linear)
    with pytest.raises(M.ModelLoadError, match="zit_scaled.safetensors: block swap streams bf16 or fp8 "):
        M.load_transformer(path, storage="nf4", block_device="cpu")

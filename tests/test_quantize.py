"""Training on quantized bases: ComfyUI's fp8 / int8 checkpoint layouts decoded exactly, fp8 storage (kept
bytes or per-row requantization), bitsandbytes nf4/int8, refusals from the header, and LoRAs trained on an
fp8 base that apply to the bf16 model.

Quantized files are written here from the tiny model in ComfyUI's NextDiT layout (`to_comfy_state_dict`),
with the block Linears quantized per tensor the way ComfyUI's converters do.
"""

from __future__ import annotations

import copy
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trainer import model as M
from trainer.lora.formats import read_lora
from trainer.lora.spec import ZitSpec
from trainer.lora.writing import write_lora
from trainer.model.adapters import _lora_layers as lora_layers
from trainer.model.checkpoint_quant import QuantLayout, checkpoint_layout, quant_layout
from trainer.model.headers import read_header_and_metadata
from trainer.model.keys import diffusers_keys
from trainer.model.quantize import FP8, QUANTIZED_MODULES, Fp8Linear, quantize_transformer
from trainer.objective import add_noise, velocity_target
from trainer.tiny import TINY_SPEC, save_tiny_checkpoints

F32 = torch.float32
E5M2 = torch.float8_e5m2
# The ComfyUI (fused) names of the block Linears that QUANTIZED_MODULES stores quantized.
COMFY_BLOCK_LINEAR = re.compile(
    r"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123])"
)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# ComfyUI-style quantized files
# ----------------------------------------------------------------------------------------------------


def _quantize_per_tensor(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, 0-dim float32 scale) as ComfyUI's converters store a per-tensor quantized weight."""
    if fmt == "int8_tensorwise":
        scale = w.abs().max().float() / 127
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    dtype = FP8 if fmt == "float8_e4m3fn" else E5M2
    scale = w.abs().max().float() / torch.finfo(dtype).max
    return (w / scale).to(dtype), scale


Stored = dict[str, tuple[torch.Tensor, torch.Tensor]]


def write_quantized(path: Path, model: nn.Module, layout: str, fmt: str = "float8_e4m3fn", prefix: str = "",
                    metadata: bool = True, markers: bool = False) -> Stored:
    """Write `model` as a ComfyUI file whose block Linears are quantized; returns {comfy key: (q, scale)}.

    layout: "fp8" (plain cast, no scales), "scaled_fp8" (scaled_fp8 marker + scale_weight + scale_input) or
    "comfy_quant" (weight_scale + `_quantization_metadata` when `metadata`, `<layer>.comfy_quant` tensors
    when `markers`).
    """
    out, stored, layers = {}, {}, {}
    for key, w in M.to_comfy_state_dict(model.state_dict(), prefix).items():
        layer = key[: -len(".weight")]
        if not (key.endswith(".weight") and COMFY_BLOCK_LINEAR.fullmatch(layer[len(prefix):])):
            out[key] = w.contiguous()
            continue
        if layout == "fp8":
            q, scale = w.clamp(-448, 448).to(FP8), torch.tensor(1.0)
        else:
            q, scale = _quantize_per_tensor(w, fmt)
        out[key] = q
        stored[key[len(prefix):]] = (q, scale)
        if layout == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale.reshape(1)
            out[f"{layer}.scale_input"] = torch.ones(1)
        elif layout == "comfy_quant":
            out[f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": fmt}
            if markers:
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()),
                                                           dtype=torch.uint8)
    if layout == "scaled_fp8":
        out[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=FP8)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=meta if layout == "comfy_quant" and metadata else None)
    return stored


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
    q, scale = _quantize_per_tensor(sd["layers.1.feed_forward.w2.weight"], "float8_e4m3fn")
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


# ----------------------------------------------------------------------------------------------------
# Refusals, from the header before anything loads
# ----------------------------------------------------------------------------------------------------


def _truncated(path: Path) -> Path:
    """Cut the file right after its header: only header checks can pass."""
    size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    path.write_bytes(path.read_bytes()[: 8 + size])
    return path


def _with_metadata_format(tmp_path: Path, source: nn.Module, fmt: object, name: str) -> Path:
    path = tmp_path / name
    sd = M.to_comfy_state_dict(source.state_dict())
    layers = {"layers.0.feed_forward.w1": {"format": "float8_e4m3fn"}, "layers.2.attention.qkv": fmt}
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].to(FP8)
    save_file(sd, str(path), metadata={"_quantization_metadata": json.dumps({"layers": layers})})
    return _truncated(path)


REFUSED_FORMATS = {
    "nvfp4": {"format": "nvfp4"},
    "mxfp8": {"format": "mxfp8"},
    "unknown": {"format": "float3_magic"},
    "convrot": {"format": "int8_tensorwise", "convrot": True},
    "no format": {"group_size": 16},
}


@pytest.mark.parametrize("case", REFUSED_FORMATS)
def test_undecodable_formats_are_refused_from_the_header(tmp_path, source, case):
    path = _with_metadata_format(tmp_path, source, REFUSED_FORMATS[case], f"zit_{case.replace(' ', '_')}.st")
    with pytest.raises(M.ModelLoadError) as error:
        M.load_transformer(path, storage="fp8")  # the tensor data is gone: only the header was read
    message = str(error.value)
    assert "\n" not in message
    named = {"no format": "a format-less", "convrot": "int8_tensorwise with convrot (rotated weights)"}
    fmt = named.get(case) or REFUSED_FORMATS[case]["format"]
    assert message.startswith(f"{path.name}: {fmt} quantization (first at layers.2.attention.qkv) ")
    assert "use the bf16 file (z_image_turbo_bf16.safetensors), or an fp8 (float8_e4m3fn) one" in message
    assert M.transformer_checkpoint(path, trainable=False)[0] == [path]  # ComfyUI samples these


def test_comfy_quant_tensors_are_read_for_the_format(tmp_path, source):
    path = tmp_path / "zit_nvfp4.safetensors"
    sd = M.to_comfy_state_dict(source.state_dict())
    sd["layers.1.attention.out.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(sd, str(path))
    with pytest.raises(M.ModelLoadError, match=r"zit_nvfp4.safetensors: nvfp4 quantization \(first at "
                                               r"layers.1.attention.out\)"):
        M.transformer_checkpoint(path)


HEADER_REFUSALS = {  # extra header entries: the message
    "nvfp4 scales": ({"layers.0.attention.qkv.weight_scale_2": ("F32", [])}, "nvfp4 quantization (first at"),
    "int8 without format": ({"layers.0.attention.qkv.weight": ("I8", [192, 64])}, "I8 without a format"),
    "qweight": ({"layers.0.attention.qkv.qweight": ("I32", [192, 8])}, "Nunchaku/GPTQ-quantized model"),
    "bitsandbytes": ({"layers.0.attention.qkv.weight.absmax": ("F32", [192])}, "a bitsandbytes-saved model"),
    "bad metadata": ({"__metadata__": {"_quantization_metadata": "{x"}}, "unreadable _quantization_metadata"),
}


@pytest.mark.parametrize("case", HEADER_REFUSALS)
def test_foreign_quantizations_are_refused_from_the_header(tmp_path, source, case):
    extra, message = HEADER_REFUSALS[case]
    header = {k: {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [0, 0]}
              for k, v in M.to_comfy_state_dict(source.state_dict()).items()}
    for key, value in extra.items():
        header[key] = value if key == "__metadata__" else {"dtype": value[0], "shape": value[1],
                                                           "data_offsets": [0, 0]}
    blob = json.dumps(header).encode()
    path = tmp_path / "zit_q.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(M.ModelLoadError) as error:
        M.load_transformer(path)
    assert str(error.value).startswith("zit_q.safetensors: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_gguf_is_refused_by_name(tmp_path):
    for name in ("zit-Q8_0.gguf", "zit-q8.safetensors"):
        (tmp_path / name).write_bytes(b"GGUF" + bytes(60))
        with pytest.raises(M.ModelLoadError, match=f"{re.escape(name)}: GGUF checkpoints are not supported"):
            M.load_transformer(tmp_path / name, storage="fp8")


def test_bad_storage_is_refused(tmp_path, source):
    path = tmp_path / "zit.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    with pytest.raises(M.ModelLoadError, match="storage 'fp4': expected one of bf16, fp8, nf4, int8"):
        M.load_transformer(path, storage="fp4")
    with pytest.raises(M.ModelLoadError, match="storage 'q4'"):
        quantize_transformer(copy.deepcopy(source), "q4", F32)


# ----------------------------------------------------------------------------------------------------
# fp8 base vs bf16 base
# ----------------------------------------------------------------------------------------------------


def _velocity_inputs(spec: ZitSpec, side: int, text_len: int) -> tuple:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, spec.in_channels, side, side, generator=gen)
    return latents, torch.tensor([0.6]), [torch.randn(text_len, spec.cap_feat_dim, generator=gen)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fp8_base_velocity_is_close_to_the_bf16_base_tiny(tmp_path, source):
    path = tmp_path / "zit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in M.to_comfy_state_dict(source.state_dict()).items()},
              str(path))
    bf16 = M.load_transformer(path, dtype=F32)  # the bf16 file's weights, computed in float32
    fp8 = M.load_transformer(path, dtype=F32, storage="fp8")
    inputs = _velocity_inputs(TINY_SPEC, 8, 7)
    with torch.no_grad():
        error = _relative(M.predict_velocity(fp8, *inputs), M.predict_velocity(bf16, *inputs))
    assert 0.005 < error < 0.08  # measured 0.032 (dim 64: few weights per row, rounding averages out less)


def test_fp8_base_velocity_is_close_to_the_bf16_base_full_width():
    """One main block at Z-Image's width (dim 3840, 30 heads, FFN 10240, caption 2560; no refiners, to stay
    within seconds): Gaussian weights / sqrt(fan_in) rounded to bf16; a 32x32 latent = 256 image tokens."""
    spec = ZitSpec(dim=3840, n_layers=1, n_refiner_layers=0, n_heads=30, cap_feat_dim=2560, in_channels=16)
    model = M.build_transformer(spec, "meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_((noise * p.shape[1] ** -0.5 if p.ndim == 2 else 1 + 0.1 * noise).bfloat16())
    model.requires_grad_(False).eval()
    inputs = _velocity_inputs(spec, 32, 16)
    with torch.no_grad():
        v_bf16 = M.predict_velocity(model, *inputs)
        assert len(quantize_transformer(model, "fp8", F32)) == 7  # in place: the 7 Linears of the block
        assert isinstance(model.layers[0].feed_forward.w2, Fp8Linear)
        v_fp8 = M.predict_velocity(model, *inputs)
    assert 0.005 < _relative(v_fp8, v_bf16) < 0.05  # measured 0.033


# ----------------------------------------------------------------------------------------------------
# LoRA on an fp8 base
# ----------------------------------------------------------------------------------------------------


def _velocity(model: nn.Module, embeds: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(embeds), 16, 8, 8, generator=gen)
    return M.predict_velocity(model, latents, torch.tensor([0.3, 0.9][: len(embeds)]), embeds)


def test_peft_lora_on_fp8_linear_trains_in_the_compute_dtype(source, embeds):
    model = copy.deepcopy(source).to(torch.bfloat16)
    quantize_transformer(model, "fp8", torch.bfloat16)
    torch.manual_seed(0)
    names = M.inject_lora(model, 4, 4.0, "diffsynth")
    layers = dict(lora_layers(model))
    assert set(names) == set(layers)
    assert all(isinstance(m.get_base_layer(), Fp8Linear) for m in layers.values())
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)  # peft read Fp8Linear.compute_dtype
    for p in lora:  # as the Trainer does
        p.data = p.data.float()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["zit"].weight.normal_(0, 0.02)  # B = 0 at init would leave A without a gradient
    _velocity(model, embeds).square().mean().backward()
    for name, layer in layers.items():
        for part in (layer.lora_A["zit"].weight, layer.lora_B["zit"].weight):
            assert part.dtype == F32 and part.grad is not None and part.grad.abs().sum() > 0, name
        base = layer.get_base_layer()
        assert base.weight.dtype == FP8 and base.weight.grad is None and not base.weight.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_trained_on_an_fp8_file_applies_to_the_bf16_model(tmp_path, source, embeds):
    """End to end on a ComfyUI-style scaled-fp8 file: load in fp8 storage, train a LoRA a few steps, save it,
    load it onto the same file in bf16 storage, where it has the same shapes and changes the output."""
    path = tmp_path / "zit_fp8_scaled.safetensors"
    write_quantized(path, source, "scaled_fp8", prefix="model.diffusion_model.")
    model = M.load_transformer(path, dtype=F32, storage="fp8")
    torch.manual_seed(0)
    M.inject_lora(model, 4, 4.0, "aitoolkit")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    sigmas = torch.tensor([0.4, 0.8])
    losses = []
    for _ in range(8):
        pred = M.predict_velocity(model, add_noise(x0, noise, sigmas), sigmas, embeds)
        loss = (pred - velocity_target(x0, noise)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    trained = M.lora_from_peft(model)
    saved = read_lora(write_lora(trained, tmp_path / "lora.safetensors", dtype=F32))

    bf16 = M.load_transformer(path, dtype=F32)
    before = _velocity(bf16, embeds)
    M.load_lora_into_peft(bf16, saved, "trained", trainable=False)
    assert {k: (m.a.shape, m.b.shape) for k, m in M.lora_from_peft(bf16, "trained").modules.items()} == \
        {k: (m.a.shape, m.b.shape) for k, m in trained.modules.items()}
    after = _velocity(bf16, embeds)
    with torch.no_grad():
        on_fp8 = _velocity(model, embeds)
    change = (after - before).norm() / before.norm()
    assert change > 0.02
    # the LoRA does on the bf16 base what it did on the fp8 one, up to the fp8 rounding of the base
    assert (after - on_fp8).norm() / after.norm() < 0.08


# ----------------------------------------------------------------------------------------------------
# bitsandbytes nf4 / int8
# ----------------------------------------------------------------------------------------------------


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # not installed, or a broken install
        return None
    return bitsandbytes


BNB = _bitsandbytes()


def test_nf4_without_bitsandbytes_says_how_to_install_it(tmp_path, source, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, installed or not
    path = tmp_path / "zit.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    with pytest.raises(M.ModelLoadError, match='memory = "nf4" needs bitsandbytes: pip install bitsandbytes'):
        quantize_transformer(copy.deepcopy(source), "nf4", F32)
    for storage in ("nf4", "int8"):
        with pytest.raises(M.ModelLoadError, match=f'memory = "{storage}" needs bitsandbytes: pip install'):
            M.load_transformer(path, storage=storage)


# bitsandbytes' CPU nf4 kernel needs in_features % 64 == 0 and out_features % 32 == 0 (Z-Image's 3840 and
# 10240 are multiples of both; the tiny model's FFN of 170 is not): dim 192 gives an FFN of 512. One block
# keeps nf4's slow CPU fallback to a few seconds.
BNB_SPEC = ZitSpec(dim=192, n_layers=1, n_refiner_layers=0, n_heads=6, cap_feat_dim=32, in_channels=16)


@pytest.mark.skipif(BNB is None, reason="bitsandbytes is not installed (an optional extra)")
@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_bitsandbytes_storage_gets_peft_qlora_layers(tmp_path, embeds, storage):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        source = M.build_transformer(BNB_SPEC, "cpu").requires_grad_(False).eval()
    path = tmp_path / "zit.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    # train mode, as the Trainer runs it: in eval mode without grad bitsandbytes repacks nf4 weights for its
    # CPU kernel, which has no backward
    model = M.load_transformer(path, dtype=F32, storage=storage).train()
    kind = BNB.nn.Linear4bit if storage == "nf4" else BNB.nn.Linear8bitLt
    block = [n for n, m in model.named_modules() if QUANTIZED_MODULES.fullmatch(n)]
    assert len(block) == 7 and all(isinstance(model.get_submodule(n), kind) for n in block)
    assert getattr(model, "is_loaded_in_4bit" if storage == "nf4" else "is_loaded_in_8bit") is True
    with torch.no_grad():
        expected = _velocity(source, embeds)
        loaded = _velocity(model, embeds)
        built = copy.deepcopy(source).train()
        assert quantize_transformer(built, storage, F32) == block
        assert torch.equal(_velocity(built, embeds), loaded)  # the same quantization, loaded or applied
    error = ((loaded - expected).norm() / expected.norm()).item()
    assert (0.01 < error < 0.08) if storage == "nf4" else (0.0003 < error < 0.006)  # measured 0.033 / 0.0014

    torch.manual_seed(0)
    M.inject_lora(model, 4, 4.0, "diffsynth")
    layers = dict(lora_layers(model))
    assert len(layers) == 7 and all(type(m).__module__ == "peft.tuners.lora.bnb" for m in layers.values())
    for layer in layers.values():
        layer.lora_B["zit"].weight.data.normal_(0, 0.02)
    _velocity(model, embeds).square().mean().backward()
    grads = [layer.lora_A["zit"].weight.grad for layer in layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


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


# ----------------------------------------------------------------------------------------------------
# End to end: the Trainer on a ComfyUI-style fp8 file
# ----------------------------------------------------------------------------------------------------


def test_the_trainer_trains_on_a_comfyui_fp8_file(tmp_path, source):
    """A scaled-fp8 single file with the tiny text encoder (diffusers folder) and VAE file beside it; the
    Trainer loads it as model.memory = "fp8" asks (Fp8Linear blocks, the file's fp8 bytes) and trains."""
    from trainer.config import config_from_dict
    from trainer.demo import make_dataset
    from trainer.loop import TRAINED, Trainer
    from trainer.memory import MemoryPlan

    ckpt = save_tiny_checkpoints(tmp_path / "models")
    path = tmp_path / "models" / "z_image_turbo_fp8_scaled.safetensors"
    stored = write_quantized(path, source, "scaled_fp8", prefix="model.diffusion_model.")
    cfg = config_from_dict({
        "model": {"transformer": str(path), "text_encoder": str(ckpt.diffusers_dir), "memory": "fp8",
                  "vae": str(ckpt.vae_file), "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(make_dataset(tmp_path / "images", n=2, size=64)), "resolutions": [64],
                 "min_side": 32, "caption_dropout": 0.0, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 4, "seed": 0},
        "save": {"output_dir": str(tmp_path / "out"), "name": "run", "every": 0},
        "preview": {"every": 0},
    }, source="test")
    trainer = Trainer(cfg, plan=MemoryPlan("fp8", resolution=64))  # the plan model.memory = "fp8" gives
    qkv, scale = stored["layers.0.attention.qkv.weight"]
    to_q = trainer.model.get_submodule("layers.0.attention.to_q").get_base_layer()
    assert isinstance(to_q, Fp8Linear) and to_q.weight_scale.item() == scale.item()
    assert torch.equal(to_q.weight.view(torch.uint8), qkv.chunk(3)[0].view(torch.uint8))
    result = trainer.run()
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    saved = read_lora(result.lora_path)
    trained = M.lora_from_peft(trainer.model, TRAINED)
    assert saved.modules.keys() == trained.modules.keys()
    assert max(m.b.abs().max().item() for m in saved.modules.values()) > 0  # B left zero: nothing trained

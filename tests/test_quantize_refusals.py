"""Quantizations the loader cannot decode are refused from the safetensors header, before any tensor loads:
nvfp4 / mxfp8 / unknown / convrot formats in the metadata or comfy_quant tensors, foreign layouts (GPTQ,
bitsandbytes saves, int8 without a format, unreadable metadata), GGUF files and unknown storage names; each
message is one line naming the file, the format and the first layer.
"""

from __future__ import annotations

import copy
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from _quantize_helpers import F32
from safetensors.torch import save_file
from torch import nn

from trainer import model as M
from trainer.model.quantize import FP8, quantize_transformer

pytestmark = pytest.mark.usefixtures("one_thread")


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

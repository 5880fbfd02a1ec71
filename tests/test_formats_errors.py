"""LoRA files that are refused, and writes that cannot leave a broken file.

Foreign model families, unsupported adapter types, structural faults, bad metadata and unreadable files
each raise LoraError naming the file and the offending key; failed writes leave nothing (or the old file)
behind, written files follow the umask and tensors shared between modules are written.
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from _formats_helpers import DIM, DOWN_UP, assert_same, pair, sample_lora, save

from trainer.lora.canonical import Lora, LoraError, LoraModule
from trainer.lora.formats import DIALECTS, lora_from_state_dict, read_lora
from trainer.lora.spec import ZitSpec
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora


def good_pair(key=("L00", "q"), rank=4):
    m = random_lora(rank, keys=[key]).modules[key]
    return m.a, m.b


def expect_error(path, *fragments, **kwargs) -> str:
    with pytest.raises(LoraError) as info:
        read_lora(path, **kwargs)
    message = str(info.value)
    for fragment in (os.path.basename(str(path)), *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


FOREIGN = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "SD 1.x / SDXL"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "SD 1.x / SDXL"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "Flux"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "Flux"),
    ("lora_unet_single_blocks_0_linear1.lora_down.weight", "Flux"),
    ("transformer.transformer_blocks.3.attn.to_k.lora_A.weight", "Flux"),
    ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "Wan"),
    ("lora_unet_blocks_7_cross_attn_k.lora_down.weight", "Wan"),
    ("diffusion_model.layers.0.attention.to_q.lokr_w1", "LoKr"),
    ("lycoris_layers_0_attention_to_q.hada_w1_a", "LoHa"),
    ("lora_unet_layers_0_attention_to_q.dora_scale", "DoRA"),
    ("transformer.layers.0.attention.to_q.lora_magnitude_vector", "DoRA"),
    ("layers.0.attention.to_qkv.qweight", "nunchaku"),
    ("layers.0.feed_forward.w13.wscales", "nunchaku"),
    ("layers.0.attention.to_out.0.smooth_factor", "nunchaku"),
]


@pytest.mark.parametrize("key,what", FOREIGN)
def test_foreign_and_unsupported_files(tmp_path, key, what):
    a, b = good_pair()
    sd = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": a,
          "diffusion_model.layers.0.attention.to_q.lora_B.weight": b, key: torch.zeros(2, 8)}
    path = save(tmp_path / "foreign.safetensors", sd)
    expect_error(path, repr(key), what)
    expect_error(path, repr(key), what, dialect="aitoolkit")  # an override does not skip the check


Q = "diffusion_model.layers.0.attention.to_q"
K = "diffusion_model.layers.0.attention.to_k"
CR_ADALN = "lora_unet_context_refiner_0_adaLN_modulation_0"


def structural_cases():
    a, b = good_pair()
    k_a, k_b = good_pair(("L00", "k"))
    return {
        "rank mismatch": ({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b[:, :3]}, [f"{Q}.lora_A.weight",
                                                                                      "rank mismatch"]),
        "shape mismatch": ({f"{Q}.lora_A.weight": a[:, :1000], f"{Q}.lora_B.weight": b},
                           [f"{Q}.lora_A.weight", "layers.0.attention.to_q", "3840x1000"]),
        "layer 30": ({"diffusion_model.layers.30.attention.to_q.lora_A.weight": a,
                      "diffusion_model.layers.30.attention.to_q.lora_B.weight": b},
                     ["layers.30.attention.to_q.lora_A.weight", "does not exist"]),
        "to_z": ({"diffusion_model.layers.0.attention.to_z.lora_A.weight": a,
                  "diffusion_model.layers.0.attention.to_z.lora_B.weight": b},
                 ["layers.0.attention.to_z.lora_A.weight", "does not exist"]),
        "refiner 2": ({"diffusion_model.noise_refiner.2.attention.to_q.lora_A.weight": a,
                       "diffusion_model.noise_refiner.2.attention.to_q.lora_B.weight": b},
                      ["noise_refiner.2.attention.to_q", "does not exist"]),
        "context refiner adaLN": (pair(CR_ADALN, a, b, *DOWN_UP), [CR_ADALN, "does not exist"]),
        "A without B": ({f"{Q}.lora_A.weight": a, **pair(K, k_a, k_b)},
                        [f"{Q}.lora_A.weight", "B (up) factor is missing"]),
        "B without A": ({f"{Q}.lora_B.weight": b}, [f"{Q}.lora_B.weight", "A (down) factor is missing"]),
        "alpha alone": ({"lora_unet_layers_0_attention_to_q.alpha": torch.tensor(4.0),
                         "lora_unet_layers_0_attention_to_k.lora_down.weight": k_a,
                         "lora_unet_layers_0_attention_to_k.lora_up.weight": k_b},
                        ["lora_unet_layers_0_attention_to_q.alpha", "A and B factor is missing"]),
        "unknown key": ({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b, f"{Q}.weight": torch.zeros(2, 2)},
                        [f"{Q}.weight", "unknown key"]),
        "nan": ({f"{Q}.lora_A.weight": a.clone().index_fill_(1, torch.tensor([7]), float("nan")),
                 f"{Q}.lora_B.weight": b}, [f"{Q}.lora_A.weight", "NaN or Inf"]),
        "inf": ({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b.clone().index_fill_(0, torch.tensor([3]),
                                                                                       float("inf"))},
                [f"{Q}.lora_A.weight", "NaN or Inf"]),
        "vector factor": (pair(Q, a[0], b), [f"{Q}.lora_A.weight", "matrix"]),
        "integer factor": ({f"{Q}.lora_A.weight": a.to(torch.int32), f"{Q}.lora_B.weight": b},
                           [f"{Q}.lora_A.weight", "floating-point"]),
        "bad alpha": ({"diffusion_model.layers.0.attention.out.lora_down.weight": a,
                       "diffusion_model.layers.0.attention.out.lora_up.weight": b,
                       "diffusion_model.layers.0.attention.out.alpha": torch.ones(2)},
                      ["layers.0.attention.out.alpha", "single number"]),
        "fused and split": ({"diffusion_model.layers.0.attention.qkv.lora_down.weight": a,
                             "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.randn(3 * DIM, 4),
                             "diffusion_model.layers.0.attention.to_q.lora_down.weight": a,
                             "diffusion_model.layers.0.attention.to_q.lora_up.weight": b},
                            ["attention.qkv.lora_down.weight", "to_q.lora_down.weight", "also given"]),
        "out twice": ({"diffusion_model.layers.0.attention.out.lora_down.weight": a,
                       "diffusion_model.layers.0.attention.out.lora_up.weight": b,
                       "diffusion_model.layers.0.attention.to_out.0.lora_down.weight": a,
                       "diffusion_model.layers.0.attention.to_out.0.lora_up.weight": b},
                      ["attention.to_out.0.lora_down.weight", "attention.out.lora_down.weight"]),
        "fused wrong rows": ({"diffusion_model.layers.0.attention.qkv.lora_down.weight": a,
                              "diffusion_model.layers.0.attention.qkv.lora_up.weight": b},
                             ["layers.0.attention.qkv.lora_down.weight", "3 x 3840"]),
        "other dialect key": ({f"{Q}.lora_A.weight": a, f"{Q}.lora_B.weight": b,
                               "lora_unet_layers_0_attention_to_k.lora_down.weight": k_a,
                               "lora_unet_layers_0_attention_to_k.lora_up.weight": k_b},
                              ["diffusion_model.layers.0.attention.to_q.lora_A.weight", "unknown key"]),
    }


@pytest.mark.parametrize("case", list(structural_cases()))
def test_structural_errors(tmp_path, case):
    sd, fragments = structural_cases()[case]
    expect_error(save(tmp_path / "broken_lora.safetensors", sd), *fragments)


def test_module_outside_a_smaller_spec(tmp_path):
    a, b = good_pair(("L05", "w1"))
    sd = pair("transformer.layers.5.feed_forward.w1", a, b)
    path = save(tmp_path / "l5.safetensors", sd)
    assert set(read_lora(path).modules) == {("L05", "w1")}
    expect_error(path, "layers.5.feed_forward.w1.lora_A.weight", "does not exist", "2 layers",
                 spec=ZitSpec(n_layers=2))


@pytest.mark.parametrize("meta,fragments", [
    ({"zit.spec": "{not json"}, ["zit.spec"]),
    ({"zit.spec": json.dumps({"dim": 64, "colour": 3})}, ["zit.spec"]),
    ({"lora_adapter_metadata": "[1,"}, ["lora_adapter_metadata", "not valid JSON"]),
    ({"lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 8})},
     ["transformer.layers.0.attention.to_q.lora_A.weight", "rank 8", "rank 4"]),
])
def test_bad_metadata(tmp_path, meta, fragments):
    a, b = good_pair()
    sd = pair("transformer.layers.0.attention.to_q", a, b)
    expect_error(save(tmp_path / "meta.safetensors", sd, meta), *fragments)


def test_unreadable_files(tmp_path):
    good = write_lora(sample_lora(), tmp_path / "good.safetensors", "kohya")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "truncated.safetensors", "not a readable .safetensors file")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    expect_error(tmp_path / "zero.safetensors", "not a readable .safetensors file")
    (tmp_path / "lora.ckpt").write_bytes(b"PK\x03\x04 a zip archive, not safetensors")
    expect_error(tmp_path / "lora.ckpt", "not a readable .safetensors file")
    expect_error(tmp_path / "missing.safetensors", "no such file")
    expect_error(save(tmp_path / "empty.safetensors", {}), "contains no tensors")
    (tmp_path / "folder").mkdir()
    expect_error(tmp_path / "folder", "directory")


def test_errors_never_leak_raw_exceptions_from_state_dict():
    with pytest.raises(LoraError, match="contains no tensors"):
        lora_from_state_dict({}, {})
    with pytest.raises(LoraError, match="contains no tensors"):
        lora_from_state_dict({}, {}, dialect="kohya")


def test_write_errors(tmp_path):
    with pytest.raises(LoraError, match="no modules"):
        write_lora(Lora({}), tmp_path / "e.safetensors")
    with pytest.raises(LoraError, match="unknown dialect 'a1111'"):
        write_lora(sample_lora(), tmp_path / "e.safetensors", "a1111")
    a, b = good_pair()
    with pytest.raises(LoraError, match="layers.0.attention.to_k.*3840x10"):
        write_lora(Lora({("L00", "k"): LoraModule(a[:, :10], b)}), tmp_path / "e.safetensors")
    assert not list(tmp_path.iterdir())
    assert write_lora(sample_lora(), tmp_path / "new_dir" / "e.safetensors").is_file()  # folders are made


def test_written_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_lora(sample_lora(), tmp_path / "m.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = write_lora(sample_lora(seed=1), tmp_path / "lora.safetensors", "comfy")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a header")
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(LoraError, match=r"lora\.safetensors.*No space left"):
        write_lora(sample_lora(seed=2), path, "comfy")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_shared_tensors_are_written(tmp_path):
    """A canonical LoRA may hold one tensor in several modules; safetensors refuses shared storage."""
    a, b = good_pair(("L00", "q"))
    lora = Lora({("L00", "q"): LoraModule(a, b), ("L00", "k"): LoraModule(a, b)})
    for dialect in DIALECTS:
        assert_same(lora, read_lora(write_lora(lora, tmp_path / f"{dialect}.safetensors", dialect)))

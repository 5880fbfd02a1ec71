"""LoRA dialects: key layout and detection of each, and exact round trips between every pair.

Every dialect is written, detected and read back; converting A -> B -> A keeps the module set, the dtypes and
the factors bit for bit (so dW too), for a sample LoRA, a whole-model one, a smaller spec and random ones.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from _formats_helpers import DIM, assert_delta, assert_same, raw, sample_lora, save
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.lora.canonical import Lora, LoraError, LoraModule
from trainer.lora.formats import DIALECTS, detect_dialect, lora_from_state_dict, read_lora
from trainer.lora.spec import BASE, ZIT, ZitSpec
from trainer.lora.synth import random_lora
from trainer.lora.writing import lora_to_state_dict, write_lora

# ---------------------------------------------------------------- layouts and detection

EXPECTED_Q_KEY = {
    "aitoolkit": "diffusion_model.layers.0.attention.to_q.lora_A.weight",
    "diffusers": "transformer.layers.0.attention.to_q.lora_A.weight",
    "diffsynth": "layers.0.attention.to_q.lora_A.default.weight",
    "kohya": "lora_unet_layers_0_attention_to_q.lora_down.weight",
    "comfy": "diffusion_model.layers.0.attention.qkv.lora_down.weight",
    "lycoris": "lycoris_layers_0_attention_to_q.lora_down.weight",
}
EXPECTED_OTHER_KEYS = {
    "aitoolkit": ["diffusion_model.noise_refiner.1.adaLN_modulation.0.lora_B.weight",
                  "diffusion_model.all_final_layer.2-1.adaLN_modulation.1.lora_A.weight"],
    "diffusers": ["transformer.context_refiner.0.feed_forward.w3.lora_B.weight",
                  "transformer.t_embedder.mlp.0.lora_A.weight"],
    "diffsynth": ["layers.29.attention.to_out.0.lora_B.default.weight",
                  "cap_embedder.1.lora_A.default.weight"],
    "kohya": ["lora_unet_layers_29_attention_to_out_0.alpha",
              "lora_unet_noise_refiner_1_adaLN_modulation_0.lora_up.weight",
              "lora_unet_all_x_embedder_2-1.lora_down.weight"],
    "comfy": ["diffusion_model.layers.29.attention.out.alpha", "diffusion_model.x_embedder.lora_down.weight",
              "diffusion_model.final_layer.adaLN_modulation.1.lora_up.weight",
              "diffusion_model.context_refiner.0.attention.qkv.lora_up.weight"],
    "lycoris": ["lycoris_context_refiner_0_feed_forward_w3.lora_up.weight",
                "lycoris_all_final_layer_2-1_linear.alpha"],
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_layout_and_detection(dialect):
    sd, meta = lora_to_state_dict(sample_lora(), dialect)
    assert EXPECTED_Q_KEY[dialect] in sd
    for key in EXPECTED_OTHER_KEYS[dialect]:
        assert key in sd
    assert detect_dialect(sd) == dialect
    assert meta["zit.format"] == dialect and json.loads(meta["zit.spec"]) == ZIT.to_dict()
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    assert bool(alphas) == (dialect in ("kohya", "comfy", "lycoris"))
    for k, v in alphas.items():  # alpha = written rank: every consumer applies scale 1
        assert v.ndim == 0 and float(v) == sd[k.replace(".alpha", ".lora_down.weight")].shape[0]


def test_detection_of_other_spellings():
    assert detect_dialect(["base_model.model.layers.0.attention.to_q.lora_A.weight"]) == "diffusers"
    assert detect_dialect(["layers.0.attention.to_q.lora_A.weight"]) == "diffusers"  # peft model-level save
    assert detect_dialect(["layers.0.attention.qkv.lora_A.weight"]) == "comfy"
    assert detect_dialect(["layers.0.attention.out.lora_down.weight"]) == "comfy"
    assert detect_dialect(["diffusion_model.layers.0.feed_forward.w1.lora_down.weight"]) == "comfy"
    assert detect_dialect(["lora_unet_layers_0_attention_qkv.lora_down.weight"]) == "kohya"
    with pytest.raises(LoraError, match="cannot tell"):
        detect_dialect(["something_else"])


def test_explicit_dialect_override(tmp_path):
    """No prefix + lora_A reads as diffusers (header alpha applies); as diffsynth the header is ignored."""
    lora = random_lora(4, keys=[("L03", "w1")])
    m = lora.modules[("L03", "w1")]
    sd = {"layers.3.feed_forward.w1.lora_A.weight": m.a, "layers.3.feed_forward.w1.lora_B.weight": m.b}
    header = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    path = save(tmp_path / "bare.safetensors", sd, header)
    assert read_lora(path).metadata["zit.format"] == "diffusers"
    assert torch.equal(read_lora(path).modules[("L03", "w1")].b, m.b * 2)
    as_diffsynth = read_lora(path, dialect="diffsynth")
    assert as_diffsynth.metadata["zit.format"] == "diffsynth"
    assert torch.equal(as_diffsynth.modules[("L03", "w1")].b, m.b)
    with pytest.raises(LoraError, match=r"bare\.safetensors.*unknown key 'layers\.3\.feed_forward\.w1\."):
        read_lora(path, dialect="kohya")
    with pytest.raises(LoraError, match="unknown dialect 'sdxl'"):
        read_lora(path, dialect="sdxl")


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("src,dst", list(itertools.permutations(DIALECTS, 2)))
def test_round_trip_every_pair(tmp_path, src, dst, dtype):
    lora = sample_lora(dtype)
    a = read_lora(write_lora(lora, tmp_path / "a.safetensors", src))
    assert a.metadata["zit.format"] == src
    assert_same(lora, a)
    b = read_lora(write_lora(a, tmp_path / "b.safetensors", dst))
    assert b.metadata["zit.format"] == dst
    assert_same(lora, b)
    assert_same(lora, read_lora(write_lora(b, tmp_path / "c.safetensors", src)))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_whole_model_round_trip(tmp_path, dialect):
    """Every module ZIT has (270 in blocks + 6 BASE) survives a file round trip."""
    lora = random_lora(2, keys=ZIT.module_keys(), seed=3)
    assert len(lora) == 276
    assert_same(lora, read_lora(write_lora(lora, tmp_path / "full.safetensors", dialect)))


def test_explicit_delta_on_a_round_trip(tmp_path):
    """dW itself (not only the factors) is unchanged through kohya -> comfy -> diffusers."""
    lora = sample_lora()
    path = write_lora(lora, tmp_path / "k.safetensors", "kohya")
    path = write_lora(read_lora(path), tmp_path / "c.safetensors", "comfy")
    got = read_lora(write_lora(read_lora(path), tmp_path / "d.safetensors", "diffusers"))
    for key in [("L01", "k"), ("L02", "v"), ("NR1", "q"), (BASE, "cap_embedder.1")]:
        assert_delta(got.modules[key], lora.modules[key].delta())


def test_write_dtype_and_metadata(tmp_path):
    lora = sample_lora()
    lora.metadata["zit.name"] = "style"
    path = write_lora(lora, tmp_path / "x.safetensors", "kohya", dtype="bf16",
                      metadata={"zit.step": 1200, "zit.format": "ignored", "note": "hi"})
    sd, meta = raw(path)
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {v.dtype for k, v in sd.items() if k.endswith(".alpha")} == {torch.float32}
    assert meta["zit.format"] == "kohya" and meta["zit.step"] == "1200" and meta["note"] == "hi"
    assert meta["zit.name"] == "style" and "lora_adapter_metadata" not in meta
    back = read_lora(path)
    assert back.metadata["zit.name"] == "style" and back.metadata["zit.format"] == "kohya"
    assert all(m.a.dtype == torch.bfloat16 for m in back.modules.values())
    with pytest.raises(LoraError, match="unknown dtype 'fp8'"):
        write_lora(lora, tmp_path / "y.safetensors", dtype="fp8")


def test_spec_comes_from_metadata(tmp_path):
    small = ZitSpec(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32)
    lora = random_lora(3, spec=small, keys=small.module_keys())
    for dialect in DIALECTS:
        back = read_lora(write_lora(lora, tmp_path / f"{dialect}.safetensors", dialect))
        assert back.spec == small and set(back.modules) == set(lora.modules)
        for key, m in lora.modules.items():
            assert torch.equal(back.modules[key].a, m.a) and torch.equal(back.modules[key].b, m.b)


# ---------------------------------------------------------------- property

POOL = [("L00", c) for c in ("q", "k", "v", "out", "adaLN")] + [
    ("L29", "w2"), ("NR0", "q"), ("NR0", "v"), ("CR1", "k"), (BASE, "t_embedder.mlp.2"),
    (BASE, "all_x_embedder.2-1")]


@st.composite
def loras(draw) -> Lora:
    keys = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=len(POOL), unique=True))
    seed = draw(st.integers(0, 2**16))
    modules = {k: random_lora(draw(st.integers(1, 3)), keys=[k], seed=seed + i).modules[k]
               for i, k in enumerate(keys)}
    if draw(st.booleans()) and ("L00", "q") in modules:  # share q's A across the block's q/k/v
        a = modules[("L00", "q")].a
        for c in "kv":
            if ("L00", c) in modules:
                modules[("L00", c)] = LoraModule(a.clone(), torch.randn(DIM, a.shape[0]) * 0.02)
    return Lora(modules)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lora=loras(), src=st.sampled_from(DIALECTS), dst=st.sampled_from(DIALECTS))
def test_property_convert_a_b_a(lora, src, dst):
    def through(x: Lora, dialect: str) -> Lora:
        return lora_from_state_dict(*lora_to_state_dict(x, dialect))

    assert_same(lora, through(through(through(lora, src), dst), src))

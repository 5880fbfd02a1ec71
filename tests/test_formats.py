"""LoRA dialects: detection, exact round trips between every pair, fused qkv, alpha, errors, atomic writes.

Factors are compared bit for bit; identical A and B give identical dW = B @ A, so that is the exact dW check.
Where a conversion changes the factors (fused qkv, alpha folding) dW is computed and compared explicitly.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.lora.canonical import Lora, LoraError, LoraModule
from trainer.lora.formats import (
    DIALECTS,
    detect_dialect,
    lora_from_state_dict,
    read_lora,
)
from trainer.lora.spec import BASE, BASE_MODULES, COMPONENTS, ZIT, ZitSpec, diffusers_name
from trainer.lora.synth import random_lora
from trainer.lora.writing import lora_to_state_dict, write_lora

DIM = ZIT.dim
KEYS = [
    *[("L00", c) for c in COMPONENTS],
    ("L01", "q"), ("L01", "k"), ("L01", "v"),  # q/k/v share one A: fused without growing the rank
    ("L02", "q"), ("L02", "v"),  # a partial q/k/v block: zero-padded slice when fused
    ("L29", "out"), ("L29", "w2"),
    ("NR1", "adaLN"), ("NR1", "q"),
    ("CR0", "k"), ("CR0", "w3"),
    *[(BASE, name) for name in BASE_MODULES],
]
LOW_RANK = [("L29", "out"), ("CR0", "k"), (BASE, "cap_embedder.1"), ("L02", "v")]


def sample_lora(dtype: torch.dtype = torch.float32, seed: int = 0) -> Lora:
    """Main, refiner and BASE modules, two ranks, a shared-A q/k/v block and a partial one."""
    lora = random_lora(4, keys=KEYS, seed=seed, dtype=dtype)
    lora.modules.update(random_lora(2, keys=LOW_RANK, seed=seed + 1, dtype=dtype).modules)
    shared = lora.modules[("L01", "q")].a
    for c in "kv":
        lora.modules[("L01", c)] = LoraModule(shared.clone(), lora.modules[("L01", c)].b)
    return lora


def assert_same(want: Lora, got: Lora) -> None:
    """Same module set, dtypes and bit-identical factors (hence bit-identical dW)."""
    assert list(got.modules) == [k for k in ZIT.module_keys() if k in want.modules]
    for key, m in want.modules.items():
        g = got.modules[key]
        assert g.a.dtype == m.a.dtype and g.b.dtype == m.b.dtype, key
        assert torch.equal(g.a, m.a) and torch.equal(g.b, m.b), key


def assert_delta(got: LoraModule, want: torch.Tensor, exact: bool = True) -> None:
    d = got.delta()
    if exact:
        assert torch.equal(d, want)
    else:
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-7)


DOWN_UP = (".lora_down.weight", ".lora_up.weight")


def pair(name: str, a: torch.Tensor, b: torch.Tensor, down: str = ".lora_A.weight",
         up: str = ".lora_B.weight") -> dict[str, torch.Tensor]:
    return {name + down: a, name + up: b}


def save(path, sd: dict, metadata: dict | None = None):
    safetensors.torch.save_file({k: v.clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def raw(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


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


def test_adapter_metadata_written_for_diffusers():
    sd, meta = lora_to_state_dict(sample_lora(), "diffusers")
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["transformer.r"] == 4 and cfg["transformer.lora_alpha"] == 4
    low = {"^layers.29.attention.to_out.0", "^context_refiner.0.attention.to_k", "^cap_embedder.1",
           "^layers.2.attention.to_v"}
    assert cfg["transformer.rank_pattern"] == dict.fromkeys(low, 2)
    assert cfg["transformer.alpha_pattern"] == cfg["transformer.rank_pattern"]
    assert "all_final_layer.2-1.adaLN_modulation.1" in cfg["transformer.target_modules"]
    assert len(cfg["transformer.target_modules"]) == len(KEYS)


# ---------------------------------------------------------------- ComfyUI fused qkv

def fused_file(tmp_path, a, b, alpha=None, name="fused.safetensors", prefix="diffusion_model."):
    base = f"{prefix}layers.5.attention.qkv"
    sd = {f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b}
    if alpha is not None:
        sd[f"{base}.alpha"] = torch.tensor(float(alpha))
    return save(tmp_path / name, sd)


def test_fused_qkv_split_is_exact(tmp_path):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, DIM, generator=gen), torch.randn(3 * DIM, 4, generator=gen)
    lora = read_lora(fused_file(tmp_path, a, b, alpha=8))  # alpha 8 / rank 4: scale 2
    assert set(lora.modules) == {("L05", "q"), ("L05", "k"), ("L05", "v")}
    full = (b * 2) @ a
    for i, c in enumerate("qkv"):
        m = lora.modules[("L05", c)]
        assert torch.equal(m.a, a) and torch.equal(m.b, b[i * DIM:(i + 1) * DIM] * 2)
        assert_delta(m, full[i * DIM:(i + 1) * DIM], exact=False)


def test_fused_qkv_without_prefix_and_peft_names(tmp_path):
    a, b = torch.randn(2, DIM), torch.randn(3 * DIM, 2)
    sd = {"layers.5.attention.qkv.lora_A.weight": a, "layers.5.attention.qkv.lora_B.weight": b}
    lora = read_lora(save(tmp_path / "f.safetensors", sd))
    assert lora.metadata["zit.format"] == "comfy"
    assert torch.equal(lora.modules[("L05", "v")].b, b[2 * DIM:])


def test_fused_qkv_zero_slice_is_an_absent_module(tmp_path):
    a, b = torch.randn(2, DIM), torch.randn(3 * DIM, 2)
    b[DIM:2 * DIM] = 0
    lora = read_lora(fused_file(tmp_path, a, b))
    assert set(lora.modules) == {("L05", "q"), ("L05", "v")}


@pytest.mark.parametrize("ranks", [(2, 3, 4), (3, 3, 3)])
def test_comfy_writer_block_diagonal_keeps_delta(tmp_path, ranks):
    keys = [("L07", c) for c in "qkv"]
    lora = Lora({k: random_lora(r, keys=[k], seed=i).modules[k]
                 for i, (k, r) in enumerate(zip(keys, ranks, strict=True))})
    sd, _ = raw(write_lora(lora, tmp_path / "c.safetensors", "comfy"))
    a = sd["diffusion_model.layers.7.attention.qkv.lora_down.weight"]
    b = sd["diffusion_model.layers.7.attention.qkv.lora_up.weight"]
    assert a.shape == (sum(ranks), DIM) and b.shape == (3 * DIM, sum(ranks))
    assert float(sd["diffusion_model.layers.7.attention.qkv.alpha"]) == sum(ranks)
    full = b @ a
    for i, key in enumerate(keys):
        want = lora.modules[key].delta()
        torch.testing.assert_close(full[i * DIM:(i + 1) * DIM], want, rtol=1e-5, atol=1e-7)
    assert_same(lora, read_lora(tmp_path / "c.safetensors"))


def test_comfy_writer_shared_a_and_padding(tmp_path):
    lora = sample_lora()
    sd, _ = lora_to_state_dict(lora, "comfy")
    shared = sd["diffusion_model.layers.1.attention.qkv.lora_down.weight"]
    assert shared.shape == (4, DIM) and torch.equal(shared, lora.modules[("L01", "q")].a)
    assert float(sd["diffusion_model.layers.1.attention.qkv.alpha"]) == 4
    partial = sd["diffusion_model.layers.2.attention.qkv.lora_up.weight"]  # q rank 4, v rank 2, no k
    assert partial.shape == (3 * DIM, 6) and not partial[DIM:2 * DIM].any()
    assert "diffusion_model.layers.0.attention.to_q.lora_down.weight" not in sd


# ---------------------------------------------------------------- alpha semantics

def kohya_style_file(tmp_path, dialect, alpha, rank=4, name="alpha.safetensors"):
    m = random_lora(rank, keys=[("L04", "q")]).modules[("L04", "q")]
    name = {"kohya": "lora_unet_layers_4_attention_to_q", "lycoris": "lycoris_layers_4_attention_to_q",
            "comfy": "diffusion_model.layers.4.attention.out",
            "aitoolkit": "diffusion_model.layers.4.attention.to_q"}[dialect]
    sd = pair(name, m.a, m.b) if dialect == "aitoolkit" else pair(name, m.a, m.b, *DOWN_UP)
    if alpha is not None:
        sd[name + ".alpha"] = torch.tensor(float(alpha))
    return save(tmp_path / name, sd), m


@pytest.mark.parametrize("dialect", ["kohya", "lycoris", "comfy", "aitoolkit"])
def test_alpha_tensor_scales(tmp_path, dialect):
    path, m = kohya_style_file(tmp_path, dialect, alpha=8)
    lora = read_lora(path)
    (got,) = lora.modules.values()
    assert_delta(got, 2 * (m.b @ m.a))  # alpha 8 / rank 4: exact power-of-two fold


@pytest.mark.parametrize("dialect", ["kohya", "lycoris", "comfy"])
def test_missing_alpha_means_scale_one(tmp_path, dialect):
    """Like kohya's loader (alpha = dim), ComfyUI and diffusers: no `.alpha` tensor -> scale 1."""
    path, m = kohya_style_file(tmp_path, dialect, alpha=None)
    (got,) = read_lora(path).modules.values()
    assert torch.equal(got.b, m.b) and torch.equal(got.a, m.a)


def test_alpha_fold_keeps_dtype(tmp_path):
    m = random_lora(4, keys=[("L04", "w2")], dtype=torch.bfloat16).modules[("L04", "w2")]
    sd = {"lora_unet_layers_4_feed_forward_w2.lora_down.weight": m.a,
          "lora_unet_layers_4_feed_forward_w2.lora_up.weight": m.b,
          "lora_unet_layers_4_feed_forward_w2.alpha": torch.tensor(3.0, dtype=torch.bfloat16)}
    (got,) = read_lora(save(tmp_path / "bf.safetensors", sd)).modules.values()
    assert got.b.dtype == torch.bfloat16
    assert torch.equal(got.b, (m.b.float() * 0.75).to(torch.bfloat16))


def diffusers_file(tmp_path, config: dict | None, prefix="transformer.", name="d.safetensors", keys=None):
    lora = random_lora(4, keys=keys or [("L00", "q"), ("L00", "k")])
    sd = {}
    for key, m in lora.modules.items():
        sd.update(pair(prefix + diffusers_name(key), m.a, m.b))
    meta = None if config is None else {"lora_adapter_metadata": json.dumps(config)}
    return save(tmp_path / name, sd, meta), lora


@pytest.mark.parametrize("config,scale_q", [
    (None, 1.0),
    ({"transformer.r": 4, "transformer.lora_alpha": 8}, 2.0),  # pipeline form (keys prefixed)
    ({"r": 4, "lora_alpha": 2}, 0.5),  # model-level form
    ({"r": 4, "lora_alpha": 8, "use_rslora": True}, 4.0),  # alpha / sqrt(r)
])
def test_diffusers_header_alpha(tmp_path, config, scale_q):
    path, lora = diffusers_file(tmp_path, config)
    got = read_lora(path)
    for key, m in lora.modules.items():
        assert torch.equal(got.modules[key].b, m.b if scale_q == 1 else (m.b * scale_q))


def test_diffusers_rank_and_alpha_patterns(tmp_path):
    lora = random_lora(4, keys=[("L00", "q")])
    lora.modules.update(random_lora(2, keys=[("L00", "k")], seed=5).modules)
    sd, _ = lora_to_state_dict(lora, "diffusers")
    cfg = {"r": 4, "lora_alpha": 4, "rank_pattern": {"^layers.0.attention.to_k": 2},
           "alpha_pattern": {"to_k": 8}}
    got = read_lora(save(tmp_path / "p.safetensors", sd, {"lora_adapter_metadata": json.dumps(cfg)}))
    assert torch.equal(got.modules[("L00", "q")].b, lora.modules[("L00", "q")].b)
    assert torch.equal(got.modules[("L00", "k")].b, lora.modules[("L00", "k")].b * 4)  # alpha 8 / rank 2


def test_peft_folder_with_adapter_config(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    path, lora = diffusers_file(folder, None, prefix="base_model.model.", name="adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"}))
    for source in (folder, path):
        got = read_lora(source)
        assert got.metadata["zit.format"] == "diffusers"
        for key, m in lora.modules.items():
            assert torch.equal(got.modules[key].b, m.b * 4)


def test_diffusers_read_drops_header_alpha_after_folding(tmp_path):
    path, _ = diffusers_file(tmp_path, {"r": 4, "lora_alpha": 8})
    lora = read_lora(path)
    assert "lora_adapter_metadata" not in lora.metadata
    sd, meta = raw(write_lora(lora, tmp_path / "k.safetensors", "kohya"))
    assert "lora_adapter_metadata" not in meta
    again = read_lora(write_lora(lora, tmp_path / "d2.safetensors", "diffusers"))
    assert_same(lora, again)  # header alpha = r now: the folded scale is not applied twice


# ---------------------------------------------------------------- errors

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

"""LyCORIS (LoKr / LoHa / full diff) files for Z-Image: every producer's key names, dW, refusals, norms, SVD.

dW is checked against formulas written here independently of the module (an einsum Kronecker product, an
einsum over both Hadamard ranks, all in float64), on full-size Z-Image shapes where shapes matter. The
SVD is checked against float64 SVDs of the dense dW and against a LoKr whose spectrum is known by design.
"""

from __future__ import annotations

import math
import re

import pytest
import safetensors.torch
import torch

from trainer.lora.canonical import LoraError
from trainer.lora.formats import read_lora
from trainer.lora.lycoris import (
    delta_from_state_dict,
    delta_to_lora,
    is_lycoris,
    module_norms,
    read_delta_file,
)
from trainer.lora.spec import ZIT, ZitSpec
from trainer.lora.writing import write_lora

D, H = ZIT.dim, ZIT.ffn_hidden  # 3840, 10240
SMALL = ZitSpec(dim=96, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32)  # ffn 256


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def kron_ref(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) by its definition: row i*b + j, column k*d + l holds w1[i, k] * w2[j, l]."""
    (a, c), (b, d) = w1.shape, w2.shape
    return torch.einsum("ik,jl->ijkl", w1.double(), w2.double()).reshape(a * b, c * d)


def loha_ref(w1a, w1b, w2a, w2b) -> torch.Tensor:
    """sum over both ranks r, s of w1a[o, r] w2a[o, s] * w1b[r, i] w2b[s, i], as one float64 matmul."""
    left = torch.einsum("or,os->ors", w1a.double(), w2a.double()).flatten(1)
    right = torch.einsum("ri,si->rsi", w1b.double(), w2b.double()).flatten(0, 1)
    return left @ right


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got.double() - want).abs().max()) / float(want.abs().max())
    assert err < tol, err


def save(tmp_path, sd: dict, name: str = "adapter.safetensors", metadata: dict | None = None):
    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# Each producer's name for layer 0's to_q and feed_forward.w2 (q: 3840x3840, w2: 3840x10240).
PRODUCERS = {
    "lycoris": ("lycoris_layers_0_attention_to_q", "lycoris_layers_0_feed_forward_w2"),
    "musubi": ("lora_unet_layers_0_attention_to_q", "lora_unet_layers_0_feed_forward_w2"),
    "aitoolkit": ("diffusion_model.layers.0.attention.to_q", "diffusion_model.layers.0.feed_forward.w2"),
}


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_lokr_full_size_every_producer(tmp_path, producer):
    """q: full w1 + decomposed w2 with alpha (scale alpha / w2 rank); w2: both decomposed, no alpha."""
    q, w2 = PRODUCERS[producer]
    sd = {f"{q}.lokr_w1": rnd(60, 60, seed=1), f"{q}.lokr_w2_a": rnd(64, 8, seed=2),
          f"{q}.lokr_w2_b": rnd(8, 64, seed=3), f"{q}.alpha": torch.tensor(4.0),
          f"{w2}.lokr_w1_a": rnd(60, 4, seed=4), f"{w2}.lokr_w1_b": rnd(4, 80, seed=5),
          f"{w2}.lokr_w2_a": rnd(64, 6, seed=6), f"{w2}.lokr_w2_b": rnd(6, 128, seed=7)}
    assert is_lycoris(sd)
    df = read_delta_file(save(tmp_path, sd))
    assert list(df.modules) == [("L00", "q"), ("L00", "w2")] and df.kinds() == {"lokr": 2}
    mq, mw2 = df.modules[("L00", "q")], df.modules[("L00", "w2")]
    assert mq.scale == 0.5 and mw2.scale == 1.0 and mw2.shape == (D, H)
    close(mq.delta(), 0.5 * kron_ref(sd[f"{q}.lokr_w1"], sd[f"{q}.lokr_w2_a"] @ sd[f"{q}.lokr_w2_b"]))
    close(mw2.delta(), kron_ref(sd[f"{w2}.lokr_w1_a"] @ sd[f"{w2}.lokr_w1_b"],
                                sd[f"{w2}.lokr_w2_a"] @ sd[f"{w2}.lokr_w2_b"]))


def test_lokr_alpha_rules(tmp_path):
    """ComfyUI: w2_b's rank beats w1_b's; only w1 decomposed -> w1_b's; neither -> alpha ignored."""
    p = "lycoris_layers_1_feed_forward_w1"  # 10240 x 3840
    both = {f"{p}.lokr_w1_a": rnd(80, 3, seed=1), f"{p}.lokr_w1_b": rnd(3, 60, seed=2),
            f"{p}.lokr_w2_a": rnd(128, 5, seed=3), f"{p}.lokr_w2_b": rnd(5, 64, seed=4),
            f"{p}.alpha": torch.tensor(10.0)}
    w1_only = {f"{p}.lokr_w1_a": both[f"{p}.lokr_w1_a"], f"{p}.lokr_w1_b": both[f"{p}.lokr_w1_b"],
               f"{p}.lokr_w2": rnd(128, 64, seed=5), f"{p}.alpha": torch.tensor(10.0)}
    neither = {f"{p}.lokr_w1": rnd(80, 60, seed=6), f"{p}.lokr_w2": rnd(128, 64, seed=7),
               f"{p}.alpha": torch.tensor(10.0)}
    scales = [read_delta_file(save(tmp_path, sd, f"{i}.safetensors")).modules[("L01", "w1")].scale
              for i, sd in enumerate((both, w1_only, neither))]
    assert scales == [2.0, 10.0 / 3, 1.0]
    m = read_delta_file(tmp_path / "2.safetensors").modules[("L01", "w1")]
    close(m.delta(), kron_ref(neither[f"{p}.lokr_w1"], neither[f"{p}.lokr_w2"]))


@pytest.mark.parametrize("w2_rows", [120, 45])  # 3840 % 120 == 0 (slices are Kronecker products); 45 not
def test_comfy_fused_qkv_lokr_splits_rows(tmp_path, w2_rows):
    p = "diffusion_model.layers.3.attention.qkv"  # 11520 x 3840
    sd = {f"{p}.lokr_w1": rnd(3 * D // w2_rows, 60, seed=1), f"{p}.lokr_w2_a": rnd(w2_rows, 4, seed=2),
          f"{p}.lokr_w2_b": rnd(4, 64, seed=3), f"{p}.alpha": torch.tensor(2.0)}
    df = read_delta_file(save(tmp_path, sd))
    assert list(df.modules) == [("L03", "q"), ("L03", "k"), ("L03", "v")]
    full = 0.5 * kron_ref(sd[f"{p}.lokr_w1"], sd[f"{p}.lokr_w2_a"] @ sd[f"{p}.lokr_w2_b"])
    norms = module_norms(df)
    for i, c in enumerate("qkv"):
        close(df.modules[("L03", c)].delta(), full[i * D:(i + 1) * D])
        assert norms[("L03", c)] == pytest.approx(float(full[i * D:(i + 1) * D].norm()), rel=1e-6)


def test_loha_full_size_alpha_and_none(tmp_path):
    k, w1 = "lycoris_layers_1_attention_to_k", "diffusion_model.layers.1.feed_forward.w1"
    sd = {f"{k}.hada_w1_a": rnd(D, 4, seed=1), f"{k}.hada_w1_b": rnd(4, D, seed=2),
          f"{k}.hada_w2_a": rnd(D, 4, seed=3), f"{k}.hada_w2_b": rnd(4, D, seed=4),
          f"{k}.alpha": torch.tensor(2.0),
          f"{w1}.hada_w1_a": rnd(H, 2, seed=5), f"{w1}.hada_w1_b": rnd(2, D, seed=6),
          f"{w1}.hada_w2_a": rnd(H, 3, seed=7), f"{w1}.hada_w2_b": rnd(3, D, seed=8)}
    df = read_delta_file(save(tmp_path, sd))
    assert df.kinds() == {"loha": 2}
    mk, mw1 = df.modules[("L01", "k")], df.modules[("L01", "w1")]
    assert (mk.scale, mw1.scale) == (0.5, 1.0)
    want_k = 0.5 * loha_ref(*(sd[f"{k}.hada_w{n}_{s}"] for n in (1, 2) for s in "ab"))
    close(mk.delta(), want_k)
    close(mw1.delta(), loha_ref(*(sd[f"{w1}.hada_w{n}_{s}"] for n in (1, 2) for s in "ab")))
    assert mk.norm() == pytest.approx(float(want_k.norm()), rel=1e-9)  # exact, from the factors


def test_loha_tucker_linear_core():
    """A (rank, rank, 1, 1) core: ComfyUI's einsum "ijkl,jr,ip->prkl" per Hadamard factor."""
    p = "lycoris_layers_0_attention_to_out_0"
    sd = {f"{p}.hada_t1": rnd(3, 4, 1, 1, seed=1), f"{p}.hada_w1_a": rnd(3, 96, seed=2),
          f"{p}.hada_w1_b": rnd(4, 96, seed=3), f"{p}.hada_t2": rnd(2, 2, 1, 1, seed=4),
          f"{p}.hada_w2_a": rnd(2, 96, seed=5), f"{p}.hada_w2_b": rnd(2, 96, seed=6),
          f"{p}.alpha": torch.tensor(8.0)}
    m = delta_from_state_dict(sd, spec=SMALL).modules[("L00", "out")]
    assert m.scale == 2.0  # alpha / hada_w1_b's rows
    t = {k: v.double() for k, v in sd.items()}
    m1 = t[f"{p}.hada_w1_a"].T @ t[f"{p}.hada_t1"][:, :, 0, 0] @ t[f"{p}.hada_w1_b"]
    m2 = t[f"{p}.hada_w2_a"].T @ t[f"{p}.hada_t2"][:, :, 0, 0] @ t[f"{p}.hada_w2_b"]
    close(m.delta(), 2.0 * m1 * m2)
    assert m.norm() == pytest.approx(float((2.0 * m1 * m2).norm()), rel=1e-9)


def test_full_diff_and_lora_beside(tmp_path):
    """`.diff` is dW itself (its alpha ignored); a plain LoRA module in the same file reads beside it."""
    v, out = "lycoris_layers_2_attention_to_v", "lycoris_layers_2_attention_to_out_0"
    sd = {f"{v}.diff": rnd(D, D, seed=1), f"{v}.alpha": torch.tensor(3.0),
          f"{out}.lora_down.weight": rnd(4, D, seed=2), f"{out}.lora_up.weight": rnd(D, 4, seed=3),
          f"{out}.alpha": torch.tensor(2.0)}
    df = read_delta_file(save(tmp_path, sd))
    assert df.kinds() == {"full": 1, "lora": 1}
    assert torch.equal(df.modules[("L02", "v")].delta(), sd[f"{v}.diff"])
    close(df.modules[("L02", "out")].delta(), 0.5 * sd[f"{out}.lora_up.weight"].double()
          @ sd[f"{out}.lora_down.weight"].double())
    norms = module_norms(df)
    assert norms[("L02", "v")] == pytest.approx(float(sd[f"{v}.diff"].double().norm()), rel=1e-12)


def test_is_lycoris_only_for_lycoris_parts():
    assert is_lycoris(["lycoris_layers_0_attention_to_q.hada_w1_a"])
    assert is_lycoris(["diffusion_model.layers.0.attention.to_q.diff"])
    assert not is_lycoris(["lora_unet_layers_0_attention_to_q.lora_down.weight",
                           "lora_unet_layers_0_attention_to_q.alpha"])


P = "lycoris_layers_0_attention_to_q"
GOOD = {f"{P}.lokr_w1": rnd(8, 8, seed=1), f"{P}.lokr_w2_a": rnd(12, 2, seed=2),
        f"{P}.lokr_w2_b": rnd(2, 12, seed=3)}
REFUSALS = [
    ({f"{P}.dora_scale": torch.ones(96, 1)}, f"{P}.dora_scale", "DoRA"),
    ({f"{P}.diff_b": torch.ones(96)}, f"{P}.diff_b", "bias"),
    ({f"{P}.lokr_t2": torch.ones(2, 2, 1, 1)}, f"{P}.lokr_t2", "Tucker"),
    ({f"{P}.lokr_w3": torch.ones(2, 2)}, f"{P}.lokr_w3", "unknown LoKr part"),
    ({f"{P}.weight": torch.ones(96, 96)}, f"{P}.weight", "not a LoKr"),
    ({"lycoris_layers_1_attention_to_k.lokr_w1_a": torch.ones(8, 2)},
     "lycoris_layers_1_attention_to_k.lokr_w1_a", "lokr_w1_b is missing"),
    ({f"{P}.lokr_w1_a": torch.ones(8, 2), f"{P}.lokr_w1_b": torch.ones(2, 8)}, f"{P}.lokr_w1_a",
     "has both lokr_w1 and lokr_w1_a"),
    ({"lycoris_layers_1_attention_to_k.lokr_w1": torch.ones(8, 8),
      "lycoris_layers_1_attention_to_k.lokr_w2": torch.ones(12, 12, 3, 3)},
     "lycoris_layers_1_attention_to_k.lokr_w2", "convolution"),
    ({"lycoris_layers_1_attention_to_k.hada_w1_a": torch.ones(96, 2),
      "lycoris_layers_1_attention_to_k.hada_w1_b": torch.ones(2, 96),
      "lycoris_layers_1_attention_to_k.hada_w2_a": torch.ones(96, 2),
      "lycoris_layers_1_attention_to_k.hada_w2_b": torch.ones(2, 96),
      "lycoris_layers_1_attention_to_k.hada_t1": torch.ones(2, 2, 1, 1)},
     "lycoris_layers_1_attention_to_k.hada_t1", "hada_t2 is missing"),
    ({"lycoris_layers_2_attention_to_q.lokr_w1": torch.ones(8, 8)}, "lycoris_layers_2_attention_to_q",
     "does not exist in Z-Image"),
    ({"lycoris_layers_0_attention_to_k.lokr_w1": torch.ones(8, 8),
      "lycoris_layers_0_attention_to_k.lokr_w2": torch.ones(12, 10)},
     "lycoris_layers_0_attention_to_k.lokr_w1", "dW would be 96x80 but the model's weight is 96x96"),
    ({f"{P}.diff": torch.ones(96, 96)}, f"{P}.diff", "mixes a"),
    ({"diffusion_model.layers.0.attention.qkv.diff": torch.ones(288, 96)},
     "diffusion_model.layers.0.attention.qkv.diff", "is also given by"),
    ({f"{P}.alpha": torch.ones(2)}, f"{P}.alpha", "single number"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.ones(8, 8)},
     "lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1", "SD 1.x / SDXL"),
    ({"lycoris_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(8, 8)},
     "lycoris_double_blocks_0_img_attn_qkv.lokr_w1", "Flux"),
    ({"lycoris_layers_1_feed_forward_w1.diff": torch.ones(256, 96, dtype=torch.int32)},
     "lycoris_layers_1_feed_forward_w1.diff", "floating point"),
]


@pytest.mark.parametrize(("extra", "key", "problem"), REFUSALS, ids=[r[2] for r in REFUSALS])
def test_refusals_are_one_line_naming_the_key(tmp_path, extra, key, problem):
    path = save(tmp_path, {**GOOD, **extra}, metadata={"zit.spec": '{"dim": 96, "n_layers": 2, '
                                                       '"n_refiner_layers": 1, "cap_feat_dim": 32}'})
    with pytest.raises(LoraError) as e:
        read_delta_file(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and key in msg and problem in msg, msg


def test_nan_is_refused_when_computed():
    sd = {**GOOD, f"{P}.lokr_w1": torch.full((8, 8), float("nan"))}
    with pytest.raises(LoraError, match=rf"key '{P}.lokr_w1': contains NaN"):
        delta_from_state_dict(sd, spec=SMALL).modules[("L00", "q")].delta()


def test_empty_and_unreadable_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="not a readable .safetensors"):
        read_delta_file(bad)
    with pytest.raises(LoraError, match="no such file"):
        read_delta_file(tmp_path / "missing.safetensors")


# ---- SVD to a LoRA ---------------------------------------------------------------------------------------


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0]


def spectrum_lokr() -> dict[str, torch.Tensor]:
    """LoKr whose dW has singular values {4, 2, 1} x {3, 1} = 12, 6, 4, 3, 2, 1 (no alpha: scale 1)."""
    w1 = orthonormal(8, 3, 1) @ torch.diag(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)) \
        @ orthonormal(8, 3, 2).T
    return {f"{P}.lokr_w1": w1.float(), f"{P}.lokr_w2_a": (orthonormal(12, 2, 3) * torch.tensor([3.0, 1.0],
            dtype=torch.float64)).float(), f"{P}.lokr_w2_b": orthonormal(12, 2, 4).T.float()}


def test_energy_rule_and_errors_on_a_known_spectrum():
    df = delta_from_state_dict(spectrum_lokr(), spec=SMALL)
    sq = torch.tensor([144.0, 36, 16, 9, 4, 1])  # total 210
    for energy, k in ((0.6, 1), (0.9, 3), (0.95, 4), (1.0, 6)):  # cumulative 0.686, 0.857, 0.933, 0.976
        lora, errors = delta_to_lora(df, energy=energy)
        assert lora.modules[("L00", "q")].rank == k, energy
        assert errors["layers.0.attention.to_q"] == pytest.approx(math.sqrt(sq[k:].sum() / 210), abs=1e-6)
    lora, errors = delta_to_lora(df, rank=2, energy=0.99)  # both: the smaller rank wins
    assert lora.modules[("L00", "q")].rank == 2
    dw = df.modules[("L00", "q")].delta().double()
    got = lora.modules[("L00", "q")].delta().double()
    assert float((dw - got).norm() / dw.norm()) == pytest.approx(math.sqrt(30 / 210), rel=1e-5)


def rank_r_file() -> dict[str, torch.Tensor]:
    """One module of each kind whose dW has exactly rank 2 (LoKr 1 x 2, LoHa 1 x 2, LoRA 2, diff 2)."""
    q, k, v, o = (f"lycoris_layers_0_{n}" for n in ("attention_to_q", "attention_to_k", "attention_to_v",
                                                      "attention_to_out_0"))
    return {
        f"{q}.lokr_w1_a": rnd(8, 1, seed=1), f"{q}.lokr_w1_b": rnd(1, 8, seed=2),
        f"{q}.lokr_w2_a": rnd(12, 2, seed=3), f"{q}.lokr_w2_b": rnd(2, 12, seed=4),
        f"{q}.alpha": torch.tensor(3.0),
        f"{k}.hada_w1_a": rnd(96, 1, seed=5), f"{k}.hada_w1_b": rnd(1, 96, seed=6),
        f"{k}.hada_w2_a": rnd(96, 2, seed=7), f"{k}.hada_w2_b": rnd(2, 96, seed=8),
        f"{v}.lora_up.weight": rnd(96, 2, seed=9), f"{v}.lora_down.weight": rnd(2, 96, seed=10),
        f"{o}.diff": rnd(96, 2, seed=11) @ rnd(2, 96, seed=12),
    }


def test_exact_rank_r_is_recovered_and_errors_match_dense_svd(tmp_path):
    df = read_delta_file(save(tmp_path, rank_r_file()), spec=SMALL)
    lora, errors = delta_to_lora(df, rank=2)
    assert set(lora.modules) == {("L00", c) for c in ("q", "k", "v", "out")} and lora.ranks() == {2}
    for key, m in df.modules.items():
        dw = m.delta().double()
        rel = float((lora.modules[key].delta().double() - dw).norm() / dw.norm())
        assert rel < 2e-6, (key, rel)
    assert max(errors.values()) < 2e-6
    for m in df.modules.values():  # structured singular values = the dense float64 ones (rank 2: rest ~0)
        got, want = m.svdvals()[:4], torch.linalg.svdvals(m.delta().double())[:4]
        got = torch.cat([got, got.new_zeros(4 - len(got))])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want[0]))
    # At rank 1 the reported error is the dense float64 SVD's tail, for every kind (kron, factors, dense).
    lora1, errors1 = delta_to_lora(df, rank=1)
    for key, m in df.modules.items():
        s = torch.linalg.svdvals(m.delta().double())
        tail = math.sqrt(float(s[1:].square().sum() / s.square().sum()))
        name = f"layers.0.{'attention.to_out.0' if key[1] == 'out' else 'attention.to_' + key[1]}"
        assert errors1[name] == pytest.approx(tail, rel=1e-4, abs=1e-7)
        dw = m.delta().double()
        got = float((lora1.modules[key].delta().double() - dw).norm() / dw.norm())
        assert got == pytest.approx(tail, rel=1e-4)


def test_converted_lora_writes_and_reads_back(tmp_path):
    df = read_delta_file(save(tmp_path, {**spectrum_lokr(), f"{P}.alpha": torch.tensor(1.0)},
                              metadata={"ss_network_module": "lycoris.kohya"}), spec=SMALL)
    lora, _ = delta_to_lora(df, rank=6)
    assert lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert '"lokr": 1' in lora.metadata["zit.convert"]
    back = read_lora(write_lora(lora, tmp_path / "lora.safetensors", dialect="kohya"), spec=SMALL)
    dw = df.modules[("L00", "q")].delta().double()
    assert float((back.modules[("L00", "q")].delta().double() - dw).norm() / dw.norm()) < 1e-6


def test_convert_needs_a_valid_target():
    df = delta_from_state_dict(GOOD, spec=SMALL)
    cases = (({}, "needs a target rank"), ({"rank": 0}, "at least 1"), ({"energy": 1.5}, "(0, 1]"))
    for kwargs, text in cases:
        with pytest.raises(LoraError, match=re.escape(text)):
            delta_to_lora(df, **kwargs)


def test_zero_delta_module_is_left_out():
    sd = {**GOOD, f"{P}.alpha": torch.tensor(0.0)}  # ComfyUI: scale alpha / rank = 0
    lora, errors = delta_to_lora(delta_from_state_dict(sd, spec=SMALL), rank=4)
    assert len(lora) == 0 and errors == {"layers.0.attention.to_q": 0.0}

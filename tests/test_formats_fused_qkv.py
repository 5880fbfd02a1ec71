"""ComfyUI's fused attention qkv: reading splits it exactly into q/k/v, writing fuses q/k/v back.

A fused file's up factor is cut into three row slices (an all-zero slice is an absent module); the comfy
writer stacks q/k/v block-diagonally (or shares one A) and zero-pads a missing one, keeping every dW.
"""

from __future__ import annotations

import pytest
import torch
from _formats_helpers import DIM, assert_delta, assert_same, raw, sample_lora, save

from trainer.lora.canonical import Lora
from trainer.lora.formats import read_lora
from trainer.lora.synth import random_lora
from trainer.lora.writing import lora_to_state_dict, write_lora


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

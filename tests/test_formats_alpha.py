"""Alpha semantics: how a file's scale is folded into the factors on reading and written on saving.

kohya-style `.alpha` tensors (missing alpha means scale 1), diffusers/peft `lora_adapter_metadata` headers
(pipeline and model-level forms, rsLoRA, rank and alpha patterns), peft folders with adapter_config.json,
and the header the diffusers writer emits.
"""

from __future__ import annotations

import json

import pytest
import torch
from _formats_helpers import DOWN_UP, KEYS, assert_delta, assert_same, pair, raw, sample_lora, save

from trainer.lora.formats import read_lora
from trainer.lora.spec import diffusers_name
from trainer.lora.synth import random_lora
from trainer.lora.writing import lora_to_state_dict, write_lora


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

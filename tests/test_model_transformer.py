"""The Z-Image transformer: the tiny one's real structure and seeding, loading ComfyUI single files and
diffusers folders, per-tensor key conversion, full-size configs from a header on meta, and what loading
refuses (quantized formats, foreign models, missing keys, shards and bad paths).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _model_helpers import F32, assert_same_weights, header_file
from _model_helpers import ckpt as ckpt  # a fixture (module-scoped here)
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file
from torch import nn

from trainer import model as M
from trainer.lora.spec import ZIT
from trainer.model.keys import _convert_tensor as convert_tensor
from trainer.tiny import TINY_SPEC, tiny_transformer


def comfy_shapes(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in M.to_comfy_state_dict(model.state_dict(), prefix).items()}


# ----------------------------------------------------------------------------------------------------
# The tiny transformer
# ----------------------------------------------------------------------------------------------------


def test_tiny_transformer_has_the_real_structure_and_is_seeded(source):
    assert M.model_spec(source) == TINY_SPEC
    names = dict(source.named_modules())
    for name in ("noise_refiner.1.adaLN_modulation.0", "layers.2.attention.to_q", "context_refiner.1"):
        assert name in names
    assert "layers.3" not in names and not hasattr(names["context_refiner.0"], "adaLN_modulation")
    assert isinstance(names["all_final_layer.2-1.adaLN_modulation.0"], nn.SiLU)
    assert source.config.axes_lens == M.ZIT_AXES_LENS
    assert_same_weights(source, tiny_transformer(0))
    other = tiny_transformer(1)
    assert not torch.equal(source.layers[0].attention.to_q.weight, other.layers[0].attention.to_q.weight)
    assert not torch.equal(source.layers[0].attention.norm_q.weight, source.layers[0].attention.norm_k.weight)


# ----------------------------------------------------------------------------------------------------
# Transformer loading
# ----------------------------------------------------------------------------------------------------


def test_load_comfy_single_file_gives_the_source_weights(ckpt, source):
    model = M.load_transformer(ckpt.transformer_file, dtype=F32)
    assert_same_weights(model, source)
    public = lambda m: {k: v for k, v in dict(m.config).items() if not k.startswith("_")}  # noqa: E731
    assert public(model) == public(source)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    attention = model.layers[0].attention
    pointers = {w.untyped_storage().data_ptr() for w in (attention.to_q.weight, attention.to_k.weight,
                                                          attention.to_v.weight)}
    assert len(pointers) == 3


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_load_prefixed_bf16_comfy_file_drops_norm_final(tmp_path, prefix):
    reference = tiny_transformer().to(torch.bfloat16)
    sd = M.to_comfy_state_dict(reference.state_dict(), prefix)
    sd[prefix + "norm_final.weight"] = torch.ones(TINY_SPEC.dim, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "zit.safetensors")
    model = M.load_transformer(tmp_path / "zit.safetensors")
    assert_same_weights(model, reference)


def test_load_diffusers_folder_root_and_transformer_subfolder(ckpt, source):
    folder = ckpt.diffusers_dir / "transformer"
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    for path in (ckpt.diffusers_dir, folder):
        assert_same_weights(M.load_transformer(path, dtype=F32), source)


def test_per_tensor_conversion_matches_diffusers_converter(source):
    comfy = M.to_comfy_state_dict(source.state_dict(), "model.diffusion_model.")
    comfy["norm_final.weight"] = torch.ones(3)
    reference = convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy))
    ours = dict(pair for k, v in comfy.items() for pair in convert_tensor(k, v))
    assert ours.keys() == reference.keys() == source.state_dict().keys()
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_full_size_zit_config_from_a_header_on_meta(tmp_path):
    full = M.build_transformer(ZIT)
    assert next(full.parameters()).is_meta
    assert sum(p.numel() for p in full.parameters()) == 6_154_908_736
    path = header_file(tmp_path / "z_image_turbo_bf16.safetensors", comfy_shapes(full))
    assert M.checkpoint_spec(path) == ZIT
    config = M.transformer_config(ZIT)
    assert config["axes_dims"] == [32, 48, 48] and config["axes_lens"] == [1536, 512, 512]
    assert all(full.config[k] == v for k, v in config.items())


def _tiny_header(tmp_path, source, **changes) -> Path:
    shapes = comfy_shapes(source)
    shapes.update(changes.get("add", {}))
    for key in changes.get("drop", ()):
        shapes.pop(key)
    name = changes.get("name", "model.safetensors")
    return header_file(tmp_path / name, shapes, changes.get("dtype", "BF16"))


REFUSALS = {
    "nvfp4": ({"add": {"layers.0.feed_forward.w1.weight_scale_2": ()}},
              r"model.safetensors: nvfp4 quantization \(first at layers.0.feed_forward.w1\) .* use the bf16"),
    "fp8 header, no data": ({"dtype": "F8_E4M3"}, "model.safetensors: cannot read its tensors, truncated"),
    "nunchaku": ({"add": {"layers.0.attention.qkv.qweight": (192, 8)}}, "Nunchaku"),
    "gguf extension": ({"name": "zit-Q8_0.gguf"}, "GGUF"),
    "lumina 2": ({"add": {"x_embedder.weight": (2304, 64)}}, "Lumina 2, not Z-Image"),
    "missing keys": ({"drop": ["layers.1.feed_forward.w2.weight", "cap_pad_token"]},
                     "missing 2 weights: cap_pad_token, layers.1.feed_forward.w2.weight"),
    "unexpected keys": ({"add": {"siglip_embedder.1.weight": (64, 32)}}, "unexpected weights siglip_"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_load_transformer_refuses(tmp_path, source, case):
    changes, message = REFUSALS[case]
    with pytest.raises(M.ModelLoadError, match=message):
        M.load_transformer(_tiny_header(tmp_path, source, **changes))


def test_fp8_files_pass_both_checks_block_formats_only_the_sampling_one(tmp_path, source):
    scaled = _tiny_header(tmp_path, source, name="s.safetensors", add={
        "scaled_fp8": (0,), "layers.0.attention.qkv.scale_weight": (1,),
        "layers.0.feed_forward.w1.weight_scale": ()})
    for trainable in (False, True):  # ComfyUI samples fp8 files; we train on them
        files, _, shapes = M.transformer_checkpoint(scaled, trainable=trainable)
        assert files == [scaled] and shapes == M.transformer_checkpoint(_tiny_header(tmp_path, source))[2]
    nvfp4 = _tiny_header(tmp_path, source, name="f4.safetensors",
                         add={"layers.1.attention.qkv.weight_scale_2": ()})
    assert M.transformer_checkpoint(nvfp4, trainable=False)[0] == [nvfp4]  # ComfyUI samples nvfp4
    with pytest.raises(M.ModelLoadError, match="f4.safetensors: nvfp4 quantization"):
        M.transformer_checkpoint(nvfp4)
    nunchaku = _tiny_header(tmp_path, source, name="n.safetensors",
                            add={"layers.0.attention.qkv.qweight": (192, 8)})
    with pytest.raises(M.ModelLoadError, match="Nunchaku"):
        M.transformer_checkpoint(nunchaku, trainable=False)


FOREIGN = {
    "flux": ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux"),
    "sdxl": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "SD/SDXL"),
    "diffusers unet": ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "SD/SDXL"),
    "wan": ({"blocks.0.self_attn.q.weight": (5120, 5120)}, "Wan"),
    "lora": ({"diffusion_model.layers.0.attention.to_q.lora_A.weight": (16, 3840)}, "this is a LoRA"),
    "kohya lora": ({"lora_unet_layers_0_attention_to_q.lora_down.weight": (16, 3840),
                    "lora_unet_layers_0_attention_to_q.alpha": ()}, "this is a LoRA"),
    "text encoder": ({"model.layers.0.self_attn.q_proj.weight": (4096, 2560)}, "text encoder"),
    "vae": ({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}, "VAE"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_load_transformer_says_what_a_foreign_file_is(tmp_path, case):
    shapes, message = FOREIGN[case]
    with pytest.raises(M.ModelLoadError, match=message):
        M.load_transformer(header_file(tmp_path / "x.safetensors", shapes))


def test_load_transformer_refuses_bad_paths(tmp_path, ckpt):
    with pytest.raises(M.ModelLoadError, match="file not found"):
        M.load_transformer(tmp_path / "nope.safetensors")
    (tmp_path / "gguf.safetensors").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(M.ModelLoadError, match="GGUF checkpoints are not supported"):
        M.load_transformer(tmp_path / "gguf.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(M.ModelLoadError, match="not a safetensors file"):
        M.load_transformer(tmp_path / "junk.safetensors")
    with pytest.raises(M.ModelLoadError, match="without config.json"):
        M.load_transformer(tmp_path)
    with pytest.raises(M.ModelLoadError, match="config is for AutoencoderKL"):
        M.load_transformer(ckpt.diffusers_dir / "vae")
    with pytest.raises(M.ModelLoadError, match="it looks like a VAE"):
        M.load_transformer(ckpt.vae_file)
    with pytest.raises(M.ModelLoadError, match="text encoder"):
        M.load_transformer(ckpt.text_encoder_file)


def test_load_transformer_names_missing_shards(tmp_path, ckpt):
    source_folder = ckpt.diffusers_dir / "transformer"
    index = json.loads((source_folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[0]
    folder = tmp_path / "transformer"
    folder.mkdir()
    for f in source_folder.iterdir():
        if f.name != lost:
            (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(M.ModelLoadError, match=f"shards listed in .* are missing: {lost}"):
        M.load_transformer(folder)

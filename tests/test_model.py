"""Loading, the tiny Z-Image stack, the velocity convention, peft LoRA (trainable and stacked frozen)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config, Qwen3Model

from trainer import model as M
from trainer.lora.canonical import LoraError
from trainer.lora.spec import ATTENTION, BASE, COMPONENTS, FFN, ZIT, ZitSpec, diffusers_name
from trainer.lora.synth import random_lora
from trainer.model.adapters import _lora_layers as lora_layers
from trainer.model.keys import _convert_tensor as convert_tensor
from trainer.tiny import (
    TINY_SPEC,
    save_tiny_checkpoints,
    tiny_pipeline,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_transformer,
    tiny_vae,
    vae_to_bfl,
)

F32 = torch.float32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def velocity(model: nn.Module, embeds: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(embeds), 16, 8, 8, generator=gen)
    return M.predict_velocity(model, latents, torch.tensor([0.3, 0.9][: len(embeds)]), embeds)


def header_file(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    """A safetensors header without data: enough for every check made before weights are read."""
    header = {k: {"dtype": dtype, "shape": list(s), "data_offsets": [0, 0]} for k, s in shapes.items()}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return path


def comfy_shapes(model: nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in M.to_comfy_state_dict(model.state_dict(), prefix).items()}


# ----------------------------------------------------------------------------------------------------
# The tiny stack
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


def test_tiny_text_encoder_and_vae_are_seeded():
    assert_same_weights(tiny_text_encoder(3).model, tiny_text_encoder(3).model)
    assert_same_weights(tiny_vae(3).model, tiny_vae(3).model)
    assert not torch.equal(tiny_vae(3).model.encoder.conv_in.weight, tiny_vae(4).model.encoder.conv_in.weight)
    assert tiny_text_encoder().model.config.hidden_size == TINY_SPEC.cap_feat_dim


def test_tiny_tokenizer_speaks_the_qwen_chat_template():
    te = tiny_text_encoder()
    assert te.chat_prompts(["a fox"]) == ["<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"]
    no_think = te.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    tok = tiny_tokenizer()
    assert len(tok("<|im_start|><think>").input_ids) == 2
    assert tok.decode(tok("héllo 世界").input_ids) == "héllo 世界"


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


# ----------------------------------------------------------------------------------------------------
# Text encoder and VAE
# ----------------------------------------------------------------------------------------------------

PROMPTS = ["a red fox in the snow", "", "ein Fuchs 狐狸 " * 40]


def test_text_encoder_matches_the_pipeline_encode():
    pipe = tiny_pipeline(0)
    prompts = list(PROMPTS)
    ours = M.TextEncoder(pipe.text_encoder, pipe.tokenizer).encode(prompts)
    reference = pipe._encode_prompt(list(prompts), device=torch.device("cpu"))
    assert prompts == PROMPTS
    assert [e.shape for e in ours] == [r.shape for r in reference]
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    lengths = [len(pipe.tokenizer(p).input_ids) for p in M.TextEncoder(pipe.text_encoder, pipe.tokenizer)
               .chat_prompts(PROMPTS)]
    assert [e.shape[0] for e in ours] == [min(n, 512) for n in lengths] and lengths[2] > 512


def test_text_encoder_loads_from_folder_and_single_file(ckpt):
    reference = tiny_text_encoder(0).encode(PROMPTS[:2])
    loaded = [
        M.load_text_encoder(ckpt.diffusers_dir, dtype=F32),
        M.load_text_encoder(ckpt.diffusers_dir / "text_encoder", dtype=F32),
        M.load_text_encoder(ckpt.text_encoder_file, dtype=F32, tokenizer=ckpt.diffusers_dir / "tokenizer"),
    ]
    for te in loaded:
        assert not any(p.requires_grad for p in te.model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(te.encode(PROMPTS[:2]), reference, strict=True))
    bf16 = M.load_text_encoder(ckpt.text_encoder_file, tokenizer=ckpt.diffusers_dir / "tokenizer")
    assert bf16.model.dtype == torch.bfloat16
    with pytest.raises(M.ModelLoadError, match="needs a tokenizer folder"):
        M.load_text_encoder(ckpt.text_encoder_file)
    with pytest.raises(M.ModelLoadError, match="not a Qwen3 text encoder"):
        M.load_text_encoder(ckpt.vae_file, tokenizer=ckpt.diffusers_dir / "tokenizer")


def test_full_size_text_encoder_and_vae_configs_from_shapes():
    with torch.device("meta"):
        qwen = Qwen3Model(Qwen3Config(**M.QWEN3_4B))
        flux_vae = AutoencoderKL.from_config(M.FLUX_VAE)
    config = M.qwen3_config_from_shapes({k: tuple(v.shape) for k, v in qwen.state_dict().items()})
    assert all(getattr(config, k) == v for k, v in M.QWEN3_4B.items() if k != "rope_theta")
    assert config.rope_parameters["rope_theta"] == M.QWEN3_4B["rope_theta"]
    bfl = vae_to_bfl(flux_vae.state_dict(), 4)
    assert M.vae_config_from_bfl({k: tuple(v.shape) for k, v in bfl.items()}) == M.FLUX_VAE


def test_quantized_text_encoder_is_refused(tmp_path, ckpt):
    shapes = {k: tuple(v.shape) for k, v in load_file(ckpt.text_encoder_file).items()}
    path = header_file(tmp_path / "qwen_3_4b_fp8_scaled.safetensors", shapes, dtype="F8_E4M3")
    with pytest.raises(M.ModelLoadError, match=r"fp8 .* use the bf16 file \(qwen_3_4b.safetensors\)"):
        M.load_text_encoder(path, tokenizer=ckpt.diffusers_dir / "tokenizer")


def test_vae_loads_from_folder_and_bfl_file(ckpt):
    reference = tiny_vae(0).model
    for path in (ckpt.diffusers_dir, ckpt.diffusers_dir / "vae", ckpt.vae_file):
        vae = M.load_vae(path, dtype=F32)
        assert_same_weights(vae.model, reference)
        assert (vae.scale, vae.shift) == (0.3611, 0.1159)
    assert "decoder.up.0.block.2.conv1.weight" in load_file(ckpt.vae_file)
    with pytest.raises(M.ModelLoadError, match="not a BFL/LDM VAE; it looks like a text encoder"):
        M.load_vae(ckpt.text_encoder_file)


def test_vae_refuses_a_4_channel_vae(tmp_path):
    sd_vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)
    save_file(vae_to_bfl(sd_vae.state_dict(), 2), tmp_path / "sd_vae.safetensors")
    with pytest.raises(M.ModelLoadError, match="4 latent channels; Z-Image needs the 16-channel Flux VAE"):
        M.load_vae(tmp_path / "sd_vae.safetensors")


def test_vae_latent_convention():
    vae = tiny_vae(0)
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(images)
    raw = vae.model.encode(images).latent_dist.mode()
    assert z.shape == (2, 16, 8, 6)
    assert torch.equal(z, (raw - 0.1159) * 0.3611)
    pipeline_decode = vae.model.decode(z / 0.3611 + 0.1159).sample.clamp(-1, 1)
    assert torch.allclose(vae.decode(z), pipeline_decode, atol=1e-6)
    sampled = vae.encode(images, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(sampled, z)
    with pytest.raises(ValueError, match="multiples of 16"):
        vae.encode(images[..., :40])


# ----------------------------------------------------------------------------------------------------
# Velocity convention
# ----------------------------------------------------------------------------------------------------


def test_predict_velocity_reproduces_the_pipeline_sampler(embeds):
    pipe = tiny_pipeline(0)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    out = pipe(prompt_embeds=embeds, guidance_scale=0.0, height=64, width=64, num_inference_steps=3,
               latents=latents.clone(), output_type="latent").images
    sigmas = pipe.scheduler.sigmas
    assert len(sigmas) == 4 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    x = latents
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = M.predict_velocity(pipe.transformer, x, s.expand(2), embeds)
        x = x + (s_next - s) * v
    assert torch.allclose(x, out, atol=1e-5)


def test_predict_velocity_checks_the_batch(source, embeds):
    with pytest.raises(ValueError, match="batch mismatch"):
        M.predict_velocity(source, torch.zeros(3, 16, 8, 8), torch.zeros(3), embeds)


# ----------------------------------------------------------------------------------------------------
# LoRA targets
# ----------------------------------------------------------------------------------------------------


def expected_targets(spec: ZitSpec, preset: str) -> set[str]:
    blocks = spec.blocks()
    if preset == "aitoolkit":
        keys = [(b, c) for b in blocks if b.startswith("L") for c in COMPONENTS]
    elif preset == "diffsynth":
        keys = [(b, c) for b in blocks for c in ATTENTION + FFN]
    else:
        keys = [(b, c) for b in blocks if b.startswith("L") for c in ATTENTION]
    return {diffusers_name(k) for k in keys}


@pytest.mark.parametrize("preset", M.TARGET_PRESETS)
def test_presets_pick_exactly_the_expected_modules(source, preset):
    names = M.resolve_targets(source, preset)
    assert len(names) == len(set(names))
    assert set(names) == expected_targets(TINY_SPEC, preset)


def test_preset_counts_on_a_full_size_meta_model():
    full = M.build_transformer(ZIT)
    counts = {p: len(M.resolve_targets(full, p)) for p in M.TARGET_PRESETS}
    assert counts == {"aitoolkit": 240, "diffsynth": 238, "attention": 120}
    for preset in M.TARGET_PRESETS:
        names = M.resolve_targets(full, preset)
        assert set(names) == expected_targets(ZIT, preset)
        assert all(isinstance(full.get_submodule(n), nn.Linear) for n in names)


def test_custom_regex_is_a_full_name_match_never_a_suffix(source):
    adaln = M.resolve_targets(source, r".*adaLN_modulation\.0")
    assert adaln == [f"noise_refiner.{i}.adaLN_modulation.0" for i in range(2)] + [
        f"layers.{i}.adaLN_modulation.0" for i in range(3)]
    assert M.resolve_targets(source, r"all_final_layer\.2-1\.adaLN_modulation\.1") == [
        "all_final_layer.2-1.adaLN_modulation.1"]
    with pytest.raises(LoraError, match=r"match only all_final_layer.2-1.adaLN_modulation.0 \(SiLU\)"):
        M.resolve_targets(source, r"all_final_layer\.2-1\.adaLN_modulation\.0")
    with pytest.raises(LoraError, match="select no Linear module"):
        M.resolve_targets(source, r"to_q")
    with pytest.raises(LoraError, match="invalid regex"):
        M.resolve_targets(source, "layers.(")


# ----------------------------------------------------------------------------------------------------
# Trainable LoRA
# ----------------------------------------------------------------------------------------------------


def randomize_lora(model: nn.Module, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter in layer.lora_B:
                for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_fresh_lora_changes_nothing_and_only_it_trains(embeds, init):
    model = tiny_transformer()
    base = velocity(model, embeds)
    names = M.inject_lora(model, rank=4, alpha=4, targets="aitoolkit", init=init)
    assert len(names) == 8 * TINY_SPEC.n_layers
    assert torch.equal(velocity(model, embeds), base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names)
    assert all(".lora_" in n and n.endswith(".zit.weight") for n in trainable)
    a = model.layers[0].attention.to_q.lora_A["zit"].weight
    assert a.abs().sum() > 0 and not model.layers[0].attention.to_q.lora_B["zit"].weight.any()
    if init == "gaussian":
        assert abs(a.std().item() - 1 / 4) < 0.05


def test_lora_changes_output_only_when_enabled(embeds):
    model = tiny_transformer()
    base = velocity(model, embeds)
    M.inject_lora(model, rank=4, alpha=4, targets="diffsynth")
    randomize_lora(model, "zit", seed=1)
    changed = velocity(model, embeds)
    assert not torch.allclose(changed, base, atol=1e-4)
    M.set_adapter_enabled(model, "zit", False)
    assert torch.equal(velocity(model, embeds), base)
    M.set_adapter_enabled(model, "zit", True)
    assert torch.equal(velocity(model, embeds), changed)
    with pytest.raises(LoraError, match="already has an adapter named 'zit'"):
        M.inject_lora(model, rank=2, alpha=2)
    with pytest.raises(LoraError, match="init"):
        M.inject_lora(model, rank=2, alpha=2, init="random", adapter_name="other")


def test_lora_from_peft_folds_alpha_over_rank_and_copies():
    model = tiny_transformer()
    names = M.inject_lora(model, rank=4, alpha=8, targets="attention")
    randomize_lora(model, "zit", seed=2)
    lora = M.lora_from_peft(model, "zit")
    lora.validate("extracted")
    assert lora.spec == TINY_SPEC and len(lora) == len(names) == 12
    layer = model.layers[1].attention.to_k
    module = lora.modules[("L01", "k")]
    assert module.a.dtype == F32 and torch.equal(module.a, layer.lora_A["zit"].weight)
    assert torch.equal(module.b, layer.lora_B["zit"].weight * 2)
    with torch.no_grad():
        layer.lora_A["zit"].weight.add_(1)
    assert not torch.equal(module.a, layer.lora_A["zit"].weight)
    with pytest.raises(LoraError, match="no LoRA adapter named 'nope'"):
        M.lora_from_peft(model, "nope")


def merged_reference(lora, strength: float = 1.0) -> nn.Module:
    """The tiny transformer with strength * dW of every module added to its weights."""
    model = tiny_transformer()
    with torch.no_grad():
        for key, module in lora.modules.items():
            model.get_submodule(diffusers_name(key)).weight.add_(strength * module.delta())
    return model


def mixed_rank_lora():
    keys = [k for k in TINY_SPEC.module_keys() if k[0] in ("L00", "NR1", "CR0")] + [(BASE, "cap_embedder.1")]
    lora = random_lora(rank=4, spec=TINY_SPEC, keys=keys, seed=3, std=0.05)
    small = random_lora(rank=2, spec=TINY_SPEC, keys=[("L00", "w2")], seed=4, std=0.05)
    lora.modules.update(small.modules)
    return lora


def test_canonical_lora_round_trips_through_peft(embeds):
    lora = mixed_rank_lora()
    model = tiny_transformer()
    M.load_lora_into_peft(model, lora, "loaded", trainable=True)
    back = M.lora_from_peft(model, "loaded")
    assert back.modules.keys() == lora.modules.keys()
    for key, m in lora.modules.items():
        assert torch.equal(back.modules[key].a, m.a) and torch.equal(back.modules[key].b, m.b), key
    assert back.modules[("L00", "w2")].rank == 2
    assert all(p.requires_grad for n, p in model.named_parameters() if ".loaded." in n)
    assert torch.allclose(velocity(model, embeds), velocity(merged_reference(lora), embeds), atol=1e-5)


def test_load_lora_refuses_a_lora_for_another_model_size():
    zit_lora = random_lora(rank=2, keys=[("L00", "q")])
    with pytest.raises(LoraError, match="layers.0.attention.to_q: dW is 3840x3840 but the weight is 64x64"):
        M.load_lora_into_peft(tiny_transformer(), zit_lora, "x", trainable=False)
    deep = random_lora(rank=2, spec=ZitSpec(dim=64, n_heads=4, cap_feat_dim=32), keys=[("L29", "q")])
    with pytest.raises(LoraError, match="layers.29.attention.to_q does not exist"):
        M.load_lora_into_peft(tiny_transformer(), deep, "x", trainable=False)


# ----------------------------------------------------------------------------------------------------
# The stacked frozen training adapter
# ----------------------------------------------------------------------------------------------------


def training_adapter():
    """Like ostris' training adapter: the 8 aitoolkit modules of every main layer."""
    keys = [k for k in TINY_SPEC.module_keys() if k[0].startswith("L")]
    return random_lora(rank=4, spec=TINY_SPEC, keys=keys, seed=7, std=0.05)


def trained_model(with_adapter: bool, strength: float = 1.0) -> nn.Module:
    model = tiny_transformer()
    M.inject_lora(model, rank=4, alpha=4, targets="diffsynth")
    if with_adapter:
        M.attach_frozen_adapter(model, training_adapter(), strength=strength)
    randomize_lora(model, "zit", seed=8)
    return model


def test_adapter_disabled_is_bitwise_base_plus_trained_lora(embeds):
    stacked, plain = trained_model(True), trained_model(False)
    with M.adapter_disabled(stacked):
        off = velocity(stacked, embeds)
    assert torch.equal(off, velocity(plain, embeds))
    assert not torch.allclose(velocity(stacked, embeds), off, atol=1e-4)


def test_adapter_on_equals_merged_weights(embeds):
    model = tiny_transformer()
    M.inject_lora(model, rank=4, alpha=4, targets="diffsynth")
    M.attach_frozen_adapter(model, training_adapter(), strength=0.7)
    expected = velocity(merged_reference(training_adapter(), 0.7), embeds)
    assert torch.allclose(velocity(model, embeds), expected, atol=1e-5)


def test_adapter_stays_frozen_and_out_of_the_saved_lora(embeds):
    model = trained_model(True)
    trained = M.lora_from_peft(trained_model(False), "zit")
    with M.adapter_disabled(model):
        pass
    M.set_adapter_enabled(model, "zit", True)
    frozen = [p for n, p in model.named_parameters() if ".adapter." in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    extracted = M.lora_from_peft(model, "zit")
    assert extracted.modules.keys() == trained.modules.keys()
    assert all(torch.equal(extracted.modules[k].b, trained.modules[k].b) for k in trained.modules)
    adapter = M.lora_from_peft(model, "adapter")
    assert all(torch.equal(adapter.modules[k].b, m.b) for k, m in training_adapter().modules.items())
    velocity(model, embeds).square().mean().backward()
    assert all(p.grad is None for p in frozen)
    assert model.layers[0].attention.to_q.lora_A["zit"].weight.grad is not None


def test_all_adapters_disabled_is_the_frozen_base(embeds):
    model = trained_model(True)
    on = velocity(model, embeds)
    with M.adapters_disabled(model):
        assert torch.equal(velocity(model, embeds), velocity(tiny_transformer(), embeds))
    assert torch.equal(velocity(model, embeds), on)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".zit." in n)


def test_adapter_disabled_restores_after_an_error(embeds):
    model = trained_model(True)
    on = velocity(model, embeds)
    with pytest.raises(RuntimeError), M.adapter_disabled(model):
        raise RuntimeError
    assert torch.equal(velocity(model, embeds), on)
    with pytest.raises(LoraError, match="no adapter named 'missing'"), M.adapter_disabled(model, "missing"):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_stacked_training_step_on_cuda(ckpt, embeds):
    model = M.load_transformer(ckpt.transformer_file, device="cuda")
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    M.inject_lora(model, rank=4, alpha=4, targets="diffsynth")
    M.attach_frozen_adapter(model, training_adapter())
    latents = torch.randn(2, 16, 8, 8, device="cuda")
    sigmas = torch.tensor([0.3, 0.9], device="cuda")
    v = M.predict_velocity(model, latents, sigmas, [e.cuda() for e in embeds])
    assert v.dtype == F32 and v.device.type == "cuda"
    v.square().mean().backward()
    assert model.layers[0].attention.to_q.lora_A["zit"].weight.grad is not None

"""The text encoder and the VAE: the tiny ones' seeding and Qwen chat template, the encode matching the
pipeline's, loading from folders and single files, full-size configs from shapes, refusals (quantized text
encoder, 4-channel VAE) and the latent convention.
"""

from __future__ import annotations

import pytest
import torch
from _model_helpers import F32, assert_same_weights, header_file
from _model_helpers import ckpt as ckpt  # a fixture (module-scoped here)
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3Model

from trainer import model as M
from trainer.tiny import TINY_SPEC, tiny_pipeline, tiny_text_encoder, tiny_tokenizer, tiny_vae, vae_to_bfl

# ----------------------------------------------------------------------------------------------------
# The tiny text encoder, tokenizer and VAE
# ----------------------------------------------------------------------------------------------------


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

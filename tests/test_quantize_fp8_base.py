"""Training on an fp8 base: its velocity is close to the bf16 base's (tiny and at Z-Image's full width), peft
LoRA layers on Fp8Linear train in the compute dtype, a LoRA trained on a ComfyUI fp8 file applies to the bf16
model, and the Trainer trains on such a file as model.memory = "fp8" asks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _quantize_helpers import F32, velocity, write_quantized
from safetensors.torch import save_file

from trainer import model as M
from trainer.lora.formats import read_lora
from trainer.lora.spec import ZitSpec
from trainer.lora.writing import write_lora
from trainer.model.adapters import _lora_layers as lora_layers
from trainer.model.quantize import FP8, Fp8Linear, quantize_transformer
from trainer.objective import add_noise, velocity_target
from trainer.tiny import TINY_SPEC, save_tiny_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# fp8 base vs bf16 base
# ----------------------------------------------------------------------------------------------------


def _velocity_inputs(spec: ZitSpec, side: int, text_len: int) -> tuple:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, spec.in_channels, side, side, generator=gen)
    return latents, torch.tensor([0.6]), [torch.randn(text_len, spec.cap_feat_dim, generator=gen)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fp8_base_velocity_is_close_to_the_bf16_base_tiny(tmp_path, source):
    path = tmp_path / "zit_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in M.to_comfy_state_dict(source.state_dict()).items()},
              str(path))
    bf16 = M.load_transformer(path, dtype=F32)  # the bf16 file's weights, computed in float32
    fp8 = M.load_transformer(path, dtype=F32, storage="fp8")
    inputs = _velocity_inputs(TINY_SPEC, 8, 7)
    with torch.no_grad():
        error = _relative(M.predict_velocity(fp8, *inputs), M.predict_velocity(bf16, *inputs))
    assert 0.005 < error < 0.08  # measured 0.032 (dim 64: few weights per row, rounding averages out less)


def test_fp8_base_velocity_is_close_to_the_bf16_base_full_width():
    """One main block at Z-Image's width (dim 3840, 30 heads, FFN 10240, caption 2560; no refiners, to stay
    within seconds): Gaussian weights / sqrt(fan_in) rounded to bf16; a 32x32 latent = 256 image tokens."""
    spec = ZitSpec(dim=3840, n_layers=1, n_refiner_layers=0, n_heads=30, cap_feat_dim=2560, in_channels=16)
    model = M.build_transformer(spec, "meta").to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_((noise * p.shape[1] ** -0.5 if p.ndim == 2 else 1 + 0.1 * noise).bfloat16())
    model.requires_grad_(False).eval()
    inputs = _velocity_inputs(spec, 32, 16)
    with torch.no_grad():
        v_bf16 = M.predict_velocity(model, *inputs)
        assert len(quantize_transformer(model, "fp8", F32)) == 7  # in place: the 7 Linears of the block
        assert isinstance(model.layers[0].feed_forward.w2, Fp8Linear)
        v_fp8 = M.predict_velocity(model, *inputs)
    assert 0.005 < _relative(v_fp8, v_bf16) < 0.05  # measured 0.033


# ----------------------------------------------------------------------------------------------------
# LoRA on an fp8 base
# ----------------------------------------------------------------------------------------------------


def test_peft_lora_on_fp8_linear_trains_in_the_compute_dtype(source, embeds):
    model = copy.deepcopy(source).to(torch.bfloat16)
    quantize_transformer(model, "fp8", torch.bfloat16)
    torch.manual_seed(0)
    names = M.inject_lora(model, 4, 4.0, "diffsynth")
    layers = dict(lora_layers(model))
    assert set(names) == set(layers)
    assert all(isinstance(m.get_base_layer(), Fp8Linear) for m in layers.values())
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)  # peft read Fp8Linear.compute_dtype
    for p in lora:  # as the Trainer does
        p.data = p.data.float()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B["zit"].weight.normal_(0, 0.02)  # B = 0 at init would leave A without a gradient
    velocity(model, embeds).square().mean().backward()
    for name, layer in layers.items():
        for part in (layer.lora_A["zit"].weight, layer.lora_B["zit"].weight):
            assert part.dtype == F32 and part.grad is not None and part.grad.abs().sum() > 0, name
        base = layer.get_base_layer()
        assert base.weight.dtype == FP8 and base.weight.grad is None and not base.weight.requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_trained_on_an_fp8_file_applies_to_the_bf16_model(tmp_path, source, embeds):
    """End to end on a ComfyUI-style scaled-fp8 file: load in fp8 storage, train a LoRA a few steps, save it,
    load it onto the same file in bf16 storage, where it has the same shapes and changes the output."""
    path = tmp_path / "zit_fp8_scaled.safetensors"
    write_quantized(path, source, "scaled_fp8", prefix="model.diffusion_model.")
    model = M.load_transformer(path, dtype=F32, storage="fp8")
    torch.manual_seed(0)
    M.inject_lora(model, 4, 4.0, "aitoolkit")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    sigmas = torch.tensor([0.4, 0.8])
    losses = []
    for _ in range(8):
        pred = M.predict_velocity(model, add_noise(x0, noise, sigmas), sigmas, embeds)
        loss = (pred - velocity_target(x0, noise)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    trained = M.lora_from_peft(model)
    saved = read_lora(write_lora(trained, tmp_path / "lora.safetensors", dtype=F32))

    bf16 = M.load_transformer(path, dtype=F32)
    before = velocity(bf16, embeds)
    M.load_lora_into_peft(bf16, saved, "trained", trainable=False)
    assert {k: (m.a.shape, m.b.shape) for k, m in M.lora_from_peft(bf16, "trained").modules.items()} == \
        {k: (m.a.shape, m.b.shape) for k, m in trained.modules.items()}
    after = velocity(bf16, embeds)
    with torch.no_grad():
        on_fp8 = velocity(model, embeds)
    change = (after - before).norm() / before.norm()
    assert change > 0.02
    # the LoRA does on the bf16 base what it did on the fp8 one, up to the fp8 rounding of the base
    assert (after - on_fp8).norm() / after.norm() < 0.08


# ----------------------------------------------------------------------------------------------------
# End to end: the Trainer on a ComfyUI-style fp8 file
# ----------------------------------------------------------------------------------------------------


def test_the_trainer_trains_on_a_comfyui_fp8_file(tmp_path, source):
    """A scaled-fp8 single file with the tiny text encoder (diffusers folder) and VAE file beside it; the
    Trainer loads it as model.memory = "fp8" asks (Fp8Linear blocks, the file's fp8 bytes) and trains."""
    from trainer.config import config_from_dict
    from trainer.demo import make_dataset
    from trainer.loop import TRAINED, Trainer
    from trainer.memory import MemoryPlan

    ckpt = save_tiny_checkpoints(tmp_path / "models")
    path = tmp_path / "models" / "z_image_turbo_fp8_scaled.safetensors"
    stored = write_quantized(path, source, "scaled_fp8", prefix="model.diffusion_model.")
    cfg = config_from_dict({
        "model": {"transformer": str(path), "text_encoder": str(ckpt.diffusers_dir), "memory": "fp8",
                  "vae": str(ckpt.vae_file), "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(make_dataset(tmp_path / "images", n=2, size=64)), "resolutions": [64],
                 "min_side": 32, "caption_dropout": 0.0, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 4, "seed": 0},
        "save": {"output_dir": str(tmp_path / "out"), "name": "run", "every": 0},
        "preview": {"every": 0},
    }, source="test")
    trainer = Trainer(cfg, plan=MemoryPlan("fp8", resolution=64))  # the plan model.memory = "fp8" gives
    qkv, scale = stored["layers.0.attention.qkv.weight"]
    to_q = trainer.model.get_submodule("layers.0.attention.to_q").get_base_layer()
    assert isinstance(to_q, Fp8Linear) and to_q.weight_scale.item() == scale.item()
    assert torch.equal(to_q.weight.view(torch.uint8), qkv.chunk(3)[0].view(torch.uint8))
    result = trainer.run()
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    saved = read_lora(result.lora_path)
    trained = M.lora_from_peft(trainer.model, TRAINED)
    assert saved.modules.keys() == trained.modules.keys()
    assert max(m.b.abs().max().item() for m in saved.modules.values()) > 0  # B left zero: nothing trained

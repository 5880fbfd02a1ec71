"""The training loop end to end on the tiny model (CPU, fp32): learning, the saved LoRA (plain and over a
training adapter), bitwise resume, EMA, gradient checkpointing, differential guidance and turbo health.

The runs, fixtures and comparisons are in _loop_helpers; stop and failure, bad input, the warm cache and the
command line have their own test_loop_*.py files. test_distill_mode and test_family import SIZE,
make_config, tensors and assert_same_tensors from here.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch
from _loop_helpers import SIZE, StopAfter, assert_same_tensors, make_config, max_diff, merge_sections, tensors
from _loop_helpers import cache as cache  # a fixture (module-scoped here)
from _loop_helpers import images as images  # a fixture (module-scoped here)
from PIL import Image

from trainer import sampling, tiny
from trainer.checkpoint import find_latest_checkpoint
from trainer.demo import make_adapter, make_dataset
from trainer.loop import TRAINED, Trainer, train
from trainer.lora.formats import read_lora
from trainer.lora.spec import diffusers_name
from trainer.model import adapters_disabled, load_lora_into_peft, lora_from_peft, predict_velocity
from trainer.sampling import SamplerSettings, grid, sample_latents, to_pil

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- learning ------------------------------------------------------------------------------------------


def test_loss_falls_on_an_overfit_set(tmp_path):
    one = make_dataset(tmp_path / "one", n=1, size=SIZE)
    cfg = make_config(tmp_path, one, data={"caption": "zqx, a red circle"},
                      objective={"timesteps": "logit_normal", "logit_std": 0.01},  # sigma 0.5 +- 0.003
                      optim={"steps": 80, "lr": 1e-2})
    losses = train(cfg).losses
    assert len(losses) == 80 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.85 * first, f"loss {first:.4f} -> {last:.4f}"


# ---- what is saved -------------------------------------------------------------------------------------


def test_saved_lora_changes_the_output_only_when_loaded(tmp_path, images, cache):
    trainer = Trainer(make_config(tmp_path, images, cache))
    path = trainer.run().lora_path
    lora = read_lora(path)
    gen = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=gen), torch.tensor([0.6])
    text = [torch.randn(12, tiny.TINY_SPEC.cap_feat_dim, generator=gen)]

    model = tiny.tiny_transformer(0)
    base = predict_velocity(model, x, sigma, text)
    load_lora_into_peft(model, lora, "loaded", trainable=False)
    with_lora = predict_velocity(model, x, sigma, text)
    with adapters_disabled(model):
        disabled = predict_velocity(model, x, sigma, text)

    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)
    trainer.model.eval()
    with torch.no_grad():
        in_training = predict_velocity(trainer.model, x, sigma, text)
    torch.testing.assert_close(in_training, with_lora, atol=1e-5, rtol=1e-5)
    assert lora.metadata["zit.step"] == "6" and lora.metadata["zit.base_model"] == "tiny-0"


def test_adapter_mode_saves_only_the_trained_lora_and_previews_without_the_adapter(
    tmp_path, images, cache, monkeypatch
):
    latents: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        z = sample_latents(*args, **kwargs)
        latents.append(z.clone())
        return z

    monkeypatch.setattr(sampling, "sample_latents", spy)
    adapter = make_adapter(tmp_path / "adapter.safetensors")
    prompts = ["zqx, a red circle", "a blue square"]
    cfg = make_config(tmp_path, images, cache, lora={"rank": 8, "alpha": 8.0},
                      turbo={"mode": "adapter", "adapter": str(adapter)},
                      preview={"every": 6, "prompts": prompts, "width": SIZE, "height": SIZE, "seed": 3})
    trainer = Trainer(cfg)
    result = trainer.run()
    assert len(result.previews) == 2 and len(latents) == 2  # before training and at the end

    saved = read_lora(result.lora_path)
    trained = lora_from_peft(trainer.model, TRAINED)
    assert saved.ranks() == {8} and read_lora(adapter).ranks() == {4}
    assert saved.modules.keys() == trained.modules.keys()
    for key, module in trained.modules.items():
        assert torch.equal(saved.modules[key].a, module.a) and torch.equal(saved.modules[key].b, module.b)

    # The last preview is exactly base + saved LoRA, sampled from scratch (latents and decoded pixels).
    fresh = tiny.tiny_transformer(0)
    load_lora_into_peft(fresh, saved, "loaded", trainable=False)
    settings = SamplerSettings("turbo", cfg.preview.turbo_steps, 1.0)
    seeds = [cfg.preview.seed + i for i in range(len(prompts))]
    z = sample_latents(fresh, trainer.preview_embeds, trainer.empty_embed, seeds, SIZE, SIZE, settings)
    assert torch.equal(z, latents[-1])
    picture = grid([to_pil(tiny.tiny_vae(0).decode(z))], title="step 6, training adapter off",
                   row_labels=[f"turbo {cfg.preview.turbo_steps} steps cfg 1"], col_labels=prompts)
    assert Image.open(result.previews[-1]).convert("RGB").tobytes() == picture.tobytes()

    # ... and the adapter does matter: with it on, the same sampling gives something else.
    trainer.model.eval()
    z_with_adapter = sample_latents(trainer.model, trainer.preview_embeds, trainer.empty_embed, seeds, SIZE,
                                    SIZE, settings)
    assert (z_with_adapter - z).abs().max() > 1e-3
    with adapters_disabled(trainer.model, [TRAINED]):  # base + adapter: the adapter was really trained over
        z_adapter_only = sample_latents(trainer.model, trainer.preview_embeds, trainer.empty_embed, seeds,
                                        SIZE, SIZE, settings)
    assert (z_adapter_only - z_with_adapter).abs().max() > 1e-4


# ---- resume and EMA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {},
    {"optim": {"grad_accum": 2, "ema": True, "ema_decay": 0.9, "scheduler": "cosine", "warmup_steps": 2},
     "data": {"caption_dropout": 0.4}},
], ids=["plain", "accum2-ema-dropout-cosine"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, images, cache, extra):
    steps = 8
    full_cfg = make_config(tmp_path / "full", images, cache,
                           **merge_sections(extra, {"optim": {"steps": steps}}))
    full = train(full_cfg)

    cfg = make_config(tmp_path / "split", images, cache,
                      **merge_sections(extra, {"optim": {"steps": steps}, "save": {"every": steps // 2}}))
    first = Trainer(cfg, ctx=StopAfter(steps // 2)).run()
    assert first.stopped and first.step == steps // 2
    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == steps // 2 and ckpt.state is not None
    second = Trainer(cfg, resume=True)
    assert second.step == steps // 2
    rest = second.run()

    assert rest.step == steps and not rest.stopped
    assert rest.losses == full.losses[steps // 2:]
    assert_same_tensors(tensors(rest.lora_path), tensors(full.lora_path))


def test_ema_weights_are_saved_and_training_continues_on_the_raw_ones(tmp_path, images, cache):
    decay, steps = 0.9, 6
    cfg = make_config(tmp_path, images, cache, optim={"ema": True, "ema_decay": decay, "steps": steps})
    trainer = Trainer(cfg)
    shadow = {n: p.detach().clone() for n, p in trainer.params.items()}
    raw: dict[str, torch.Tensor] = {}

    class FoldEachStep(StopAfter):
        def emit(self, kind: str, **data: Any) -> None:  # after optimizer step k (1-based) the EMA folds in
            if kind == "progress":  # the weights with d = min(decay, (1 + i) / (10 + i)), i = k - 1 (0-based)
                i = data["step"] - 1
                d = min(decay, (1 + i) / (10 + i))
                for n, p in trainer.params.items():
                    shadow[n] = d * shadow[n] + (1 - d) * p.detach()
                    raw[n] = p.detach().clone()

    trainer.ctx = FoldEachStep(steps + 1)
    saved = read_lora(trainer.run().lora_path)

    assert all(torch.equal(p, raw[n]) for n, p in trainer.params.items())  # the swap was undone
    for key, module in saved.modules.items():
        name = diffusers_name(key)
        a, b = shadow[f"{name}.lora_A.{TRAINED}.weight"], shadow[f"{name}.lora_B.{TRAINED}.weight"]
        torch.testing.assert_close(module.a, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(module.b, b, rtol=1e-5, atol=1e-7)
    b_raw = torch.cat([raw[n].flatten() for n in sorted(raw) if ".lora_B." in n])
    b_saved = torch.cat([shadow[n].flatten() for n in sorted(shadow) if ".lora_B." in n])
    assert (b_raw - b_saved).abs().max() > 0.1 * b_raw.abs().max()


def test_gradient_checkpointing_trains_the_same_lora(tmp_path, images, cache):
    runs = [train(make_config(tmp_path / str(on), images, cache, model={"gradient_checkpointing": on},
                              optim={"steps": 3})) for on in (False, True)]
    assert runs[0].losses == runs[1].losses
    assert_same_tensors(tensors(runs[1].lora_path), tensors(runs[0].lora_path))
    assert max(m.b.abs().max().item() for m in read_lora(runs[1].lora_path).modules.values()) > 0


# ---- differential guidance ------------------------------------------------------------------------------


def test_differential_guidance_extrapolates_from_the_frozen_base(tmp_path, images, cache):
    adapter = make_adapter(tmp_path / "adapter.safetensors")
    runs = {}
    for mode, turbo in (("adapter", {}), ("adapter_dg", {"guidance_scale": 1.0})):
        cfg = make_config(tmp_path / mode, images, cache, optim={"steps": 4},
                          turbo={"mode": mode, "adapter": str(adapter), **turbo})
        runs[mode] = train(cfg)
    plain, dg = runs["adapter"], runs["adapter_dg"]
    # At step 1 the LoRA is zero, so pred = base (adapter on): target' - pred = (1 + g)(target - pred).
    assert dg.losses[0] == pytest.approx(4.0 * plain.losses[0], rel=1e-4)
    assert max_diff(tensors(dg.lora_path), tensors(plain.lora_path)) > 1e-4


# ---- turbo health --------------------------------------------------------------------------------------


def test_turbo_health_is_measured_sent_and_saved_in_the_lora(tmp_path, images, cache):
    ctx = StopAfter(10**6)
    cfg = make_config(tmp_path, images, cache, preview={"health_every": 2, "health_size": 64})
    result = Trainer(cfg, ctx).run()
    health = [d for kind, d in ctx.events if kind == "health"]
    assert [d["step"] for d in health] == [2, 4, 6]
    assert all(d["health"] > 0 and d["threshold"] > 1 for d in health)
    assert health[0]["health"] != health[-1]["health"]  # the LoRA moved the 8-step trajectory
    saved = read_lora(result.lora_path).metadata["zit.turbo_health"]
    assert float(saved) == pytest.approx(health[-1]["health"], abs=1e-4)

"""The velocity convention the trainer trains through, and peft LoRA on the tiny transformer: target
presets and custom regexes, the trainable LoRA (init, enabling, extraction, round trips, refusals) and the
stacked frozen training adapter.
"""

from __future__ import annotations

import pytest
import torch
from _model_helpers import F32
from _model_helpers import ckpt as ckpt  # a fixture (module-scoped here)
from torch import nn

from trainer import model as M
from trainer.lora.canonical import LoraError
from trainer.lora.spec import ATTENTION, BASE, COMPONENTS, FFN, ZIT, ZitSpec, diffusers_name
from trainer.lora.synth import random_lora
from trainer.model.adapters import _lora_layers as lora_layers
from trainer.tiny import TINY_SPEC, tiny_pipeline, tiny_transformer


def velocity(model: nn.Module, embeds: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(embeds), 16, 8, 8, generator=gen)
    return M.predict_velocity(model, latents, torch.tensor([0.3, 0.9][: len(embeds)]), embeds)


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

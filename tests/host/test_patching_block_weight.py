"""The ZIT LoRA block-weight loader in a real ComfyUI (in-process, CPU): at all 1 it patches what core
LoraLoaderModelOnly patches (the same weights and the same model output, also against diffusers at dim 1024),
a block at 0 equals the file without that block, and a zero weight adds no patch.

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
The toy models and LoRAs are _patching_helpers'.

What core ComfyUI does with a kohya/musubi file (`lora_unet_layers_N_attention_to_q`): its key map knows
`lora_unet_` + ComfyUI names only, so it loads the modules whose diffusers and ComfyUI names coincide
(feed_forward.w1/w2/w3, adaLN_modulation.0, cap_embedder.1) and logs "lora key not loaded" for q, k, v, out
and the renamed BASE modules (ComfyUI issue #11487); our loader patches all of them.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from _patching_helpers import (  # noqa: E402
    KEYS,
    SPEC,
    assert_states_equal,
    core_load,
    diffusers_model,
    lora_for,
    rows,
    state,
    weight_key,
)
from _patching_helpers import _like_comfyui as _like_comfyui  # a fixture (autouse here)  # noqa: E402
from _patching_helpers import base as base  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import dmodel as dmodel  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import loras as loras  # a fixture (module-scoped here)  # noqa: E402
from zit_trainer_pack.nodes import lora_nodes  # noqa: E402
from zit_trainer_pack.trainer.lora import formats, writing  # noqa: E402
from zit_trainer_pack.trainer.lora.spec import ZitSpec, comfy_name, diffusers_name  # noqa: E402
from zit_trainer_pack.trainer.lora.synth import random_lora  # noqa: E402
from zit_trainer_pack.trainer.model import to_comfy_state_dict  # noqa: E402

# ---- (3) block-weight loader at all 1 == core LoraLoaderModelOnly ----------------------------------------


@pytest.mark.parametrize("dialect", ["aitoolkit", "diffusers", "diffsynth", "comfy", "lycoris"])
def test_block_weight_all_ones_equals_core(base, loras, dialect):
    name = loras(f"core_{dialect}.safetensors", lora_for(6), dialect)
    ours, vector = lora_nodes.ZITLoraLoaderBlockWeight.execute(base, name, 0.8, "all", "")
    core = core_load(base, name, 0.8)
    assert vector == ",".join(["1"] * 35)
    got, want = state(ours), state(core)
    if dialect == "comfy":  # one fused qkv patch of rank 3r with zero blocks: same sum, another GEMM shape
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=0, msg=k)
    else:
        assert_states_equal(got, want)
    assert set(ours.patches) == set(core.patches)


def test_block_weight_kohya_patches_what_core_skips(base, loras, caplog):
    lora = lora_for(7)
    name = loras("core_kohya.safetensors", lora, "kohya")
    with caplog.at_level(logging.WARNING):
        core = state(core_load(base, name, 1.0))
    assert "lora key not loaded" in caplog.text
    ours = state(lora_nodes.ZITLoraLoaderBlockWeight.execute(base, name, 1.0, "all", "")[0])
    clean = state(base)
    for key in KEYS:
        k, r = weight_key(key), rows(key)
        assert not torch.equal(ours[k][r], clean[k][r]), k
        if diffusers_name(key) == comfy_name(key):  # feed_forward.*, adaLN_modulation.0, cap_embedder.1
            assert torch.equal(core[k][r], ours[k][r]), k
        else:  # attention q/k/v/out and the renamed BASE modules: core leaves them alone
            assert torch.equal(core[k][r], clean[k][r]), k


def run_comfy(patcher, x: torch.Tensor, context: torch.Tensor, s: float) -> torch.Tensor:
    """ComfyUI's NextDiT output with the MODEL's patches applied (noise level s)."""
    patcher.patch_model()
    try:
        return patcher.model.diffusion_model(x, torch.tensor([s]), context, context.shape[1])
    finally:
        patcher.unpatch_model()


def test_same_model_output_as_core(base, loras):
    name = loras("forward.safetensors", lora_for(8), "aitoolkit")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 7, SPEC.cap_feat_dim, generator=torch.Generator().manual_seed(1))
    patched = lora_nodes.ZITLoraLoaderBlockWeight.execute(base, name, 1.0, "all", "")[0]
    ours = run_comfy(patched, x, context, 0.6)
    assert torch.equal(ours, run_comfy(core_load(base, name, 1.0), x, context, 0.6))
    assert not torch.equal(ours, run_comfy(base, x, context, 0.6))


@pytest.mark.filterwarnings("ignore")
def test_same_model_output_as_diffusers_loader(loras):
    """At dim 1024 ComfyUI's NextDiT and diffusers' transformer have the same weights: compare outputs."""
    from diffusers import ZImagePipeline

    spec = ZitSpec(dim=1024, n_layers=1, n_refiner_layers=1, n_heads=8, cap_feat_dim=32, in_channels=16)
    model = diffusers_model(spec, std=0.02)
    plain = host.comfy_model(spec, to_comfy_state_dict(model.state_dict()))
    name = loras("forward_1024.safetensors", random_lora(4, spec, keys=spec.module_keys(), seed=17, std=0.1))
    ours = lora_nodes.ZITLoraLoaderBlockWeight.execute(plain, name, 1.0, "all", "")[0]
    sd, meta = ZImagePipeline.lora_state_dict(str(loras.folder / name), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(sd, transformer=model, adapter_name="x", metadata=meta)
    assert sum(1 for m in model.modules() if "x" in getattr(m, "lora_A", {})) == len(spec.module_keys())

    gen = torch.Generator().manual_seed(0)
    x, context, s = torch.randn(1, 16, 8, 16, generator=gen), torch.randn(1, 32, 32, generator=gen), 0.6
    comfy_out = run_comfy(ours, x, context, s)[0]
    # diffusers: a list of (C, F, H, W) latents, time 1 - s, and the velocity with the opposite sign
    velocity = model([x[0][:, None]], torch.tensor([1 - s]), [context[0]], return_dict=False)[0][0]
    diffusers_out = -velocity[:, 0]
    torch.testing.assert_close(comfy_out, diffusers_out, atol=2e-5, rtol=1e-5)
    assert (comfy_out - run_comfy(plain, x, context, s)[0]).abs().max() > 1e-2
    assert torch.equal(comfy_out, run_comfy(core_load(plain, name, 1.0), x, context, s)[0])


# ---- (4) a block at 0 == the file without that block ---------------------------------------------------


def test_zero_block_equals_deleted_keys(base, loras):
    name = loras("blocks.safetensors", lora_for(9), "aitoolkit")
    sd, meta = writing.lora_to_state_dict(formats.read_lora(loras.folder / name, spec=SPEC), "aitoolkit")
    kept = {k: v for k, v in sd.items() if ".layers.1." not in k and ".noise_refiner.0." not in k}
    assert len(kept) < len(sd)
    safetensors.torch.save_file(kept, str(loras.folder / "blocks_deleted.safetensors"), metadata=meta)

    ours, vector = lora_nodes.ZITLoraLoaderBlockWeight.execute(base, name, 1.0, "L01=0,NR0=0", "")
    core = core_load(base, "blocks_deleted.safetensors", 1.0)
    assert vector.split(",")[2] == "0" and vector.split(",")[31] == "0"
    assert_states_equal(state(ours), state(core))
    assert set(ours.patches) == set(core.patches)


# ---- (5) zero weight adds no patch ------------------------------------------------------------------------


def test_zero_weight_adds_no_patch(base, loras):
    name = loras("zero.safetensors", lora_for(10), "aitoolkit")
    node = lora_nodes.ZITLoraLoaderBlockWeight
    assert node.execute(base, name, 0.0, "all", "")[0] is base
    none = node.execute(base, name, 1.0, "none", "")[0]
    assert none.patches == {}
    no_layers = node.execute(base, name, 1.0, "L=0", "")[0]
    assert not any(".layers." in k for k in no_layers.patches) and no_layers.patches
    no_adaln = node.execute(base, name, 1.0, "all", "adaLN=0,q=0")[0]
    assert not any("adaLN_modulation.0" in k for k in no_adaln.patches)
    qkv = [p for k, ps in no_adaln.patches.items() if k.endswith("attention.qkv.weight") for p in ps]
    assert qkv and all(p[3][1] != 0 for p in qkv)  # no patch on the q rows (offset 0)
    half = node.execute(base, name, 2.0, "%default=0.25,L00=1", "w1=0.5")[0]
    strengths = {k: p[0] for k, ps in half.patches.items() for p in ps}
    assert strengths["diffusion_model.layers.0.feed_forward.w1.weight"] == 1.0
    assert strengths["diffusion_model.layers.1.feed_forward.w1.weight"] == 0.25
    assert strengths["diffusion_model.layers.1.feed_forward.w2.weight"] == 0.5



"""The training-adapter and distill-patch nodes in a real ComfyUI (in-process, CPU): attach then remove is
bit-exact (exact mode) or cancels a baked-in adapter (subtract mode), the patched weights equal diffusers'
own LoRA loading in every dialect, and the nodes refuse what they cannot do (nothing to remove, attached
twice, another model or size) with a message.

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
The toy models and LoRAs are _patching_helpers'.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

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
from _patching_helpers import base_bf16 as base_bf16  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import dmodel as dmodel  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import loras as loras  # a fixture (module-scoped here)  # noqa: E402
from zit_trainer_pack.nodes import adapters, patching  # noqa: E402
from zit_trainer_pack.trainer.errors import ZitError  # noqa: E402
from zit_trainer_pack.trainer.lora import writing  # noqa: E402
from zit_trainer_pack.trainer.lora.spec import ZitSpec  # noqa: E402
from zit_trainer_pack.trainer.lora.synth import random_lora  # noqa: E402
from zit_trainer_pack.trainer.model import to_comfy_state_dict  # noqa: E402

# ---- (1) attach then remove -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attach_then_remove_is_bit_exact(base, base_bf16, loras, dtype):
    model = base if dtype == "fp32" else base_bf16
    loras("adapter_1.safetensors", lora_for(1), "aitoolkit")
    loras("distill_1.safetensors", lora_for(2, keys=KEYS[::3]), "diffsynth")
    loras("style_1.safetensors", lora_for(3), "kohya")
    before = core_load(model, "style_1.safetensors", 0.7)  # the input MODEL already carries another LoRA
    want = state(before)

    with_adapter = adapters.ZITTrainingAdapterAttach.execute(before, "adapter_1.safetensors", 1.0)[0]
    both = adapters.ZITDistillPatchAttach.execute(with_adapter, "distill_1.safetensors", 0.5)[0]
    qkv = "layers.0.attention.qkv.weight"
    assert not torch.equal(state(both)[qkv], want[qkv])

    no_adapter = adapters.ZITTrainingAdapterRemove.execute(both, "exact", "adapter_1.safetensors", 1.0)[0]
    only_distill = adapters.ZITDistillPatchAttach.execute(before, "distill_1.safetensors", 0.5)[0]
    assert_states_equal(state(no_adapter), state(only_distill))
    after = adapters.ZITDistillPatchRemove.execute(no_adapter, "exact", "distill_1.safetensors", 1.0)[0]

    assert_states_equal(state(after), want)
    assert set(after.patches) == set(before.patches)
    assert all([p[1] for p in after.patches[k]] == [p[1] for p in before.patches[k]] for k in before.patches)
    assert after.patches_uuid not in (both.patches_uuid, no_adapter.patches_uuid)
    assert patching.attachments(after) == {}
    assert set(patching.attachments(both)) == {"training_adapter", "distill_patch"}


def test_subtract_cancels_a_baked_in_adapter(base, base_bf16, loras):
    """fp32: the baked-in adapter is cancelled to float rounding; bf16: only approximately (rounded bake)."""
    adapter = lora_for(4)
    loras("adapter_bake.safetensors", adapter)
    for model, tol in ((base, 1e-6), (base_bf16, 2e-2)):
        clean = state(model)
        attached = adapters.ZITTrainingAdapterAttach.execute(model, "adapter_bake.safetensors", 1.0)[0]
        baked_state = state(attached)
        baked = host.comfy_model(SPEC, baked_state, dtype=clean["x_embedder.weight"].dtype)
        removed = adapters.ZITTrainingAdapterRemove.execute(baked, "subtract", "adapter_bake.safetensors")[0]
        got = state(removed)
        for k in clean:
            if "t_embedder" not in k:  # random in each toy model (see comfy_model)
                torch.testing.assert_close(got[k].float(), clean[k].float(), atol=tol, rtol=0, msg=k)
        if model is base_bf16:
            assert any(not torch.equal(got[k], clean[k]) for k in clean if "qkv" in k)


# ---- (2) against diffusers ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dialect", ["aitoolkit", "diffusers", "diffsynth", "kohya"])
def test_patched_weights_equal_diffusers(dmodel, base, loras, dialect, tmp_path):
    from diffusers import ZImagePipeline

    lora = lora_for(5)
    name = loras(f"cross_{dialect}.safetensors", lora, dialect)
    ours = state(adapters.ZITTrainingAdapterAttach.execute(base, name, 1.0)[0])

    model = diffusers_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sd, meta = ZImagePipeline.lora_state_dict(str(loras.folder / name), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(sd, transformer=model, adapter_name="x", metadata=meta)
    merged = dict(original)
    for module_name, module in model.named_modules():
        if "x" in getattr(module, "lora_A", {}):
            merged[f"{module_name}.weight"] = original[f"{module_name}.weight"] + module.get_delta_weight("x")
    theirs = to_comfy_state_dict(merged)
    assert len([k for k in merged if not torch.equal(merged[k], original[k])]) == len(KEYS)
    for key in KEYS:
        k = weight_key(key)
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)
        assert not torch.equal(ours[k][rows(key)], base.model.diffusion_model.state_dict()[k][rows(key)])


# ---- (6) what the nodes refuse -----------------------------------------------------------------------


def test_nothing_to_remove_says_so(base, loras):
    loras("adapter_6.safetensors", lora_for(11))
    with pytest.raises(ZitError, match="nothing to remove: no training adapter was attached.*subtract"):
        adapters.ZITTrainingAdapterRemove.execute(base, "exact", "adapter_6.safetensors", 1.0)
    attached = adapters.ZITTrainingAdapterAttach.execute(base, "adapter_6.safetensors", 1.0)[0]
    with pytest.raises(ZitError, match="nothing to remove: no distill patch"):
        adapters.ZITDistillPatchRemove.execute(attached, "exact", "adapter_6.safetensors", 1.0)
    with pytest.raises(ZitError, match="already attached.*adapter_6.safetensors"):
        adapters.ZITTrainingAdapterAttach.execute(attached, "adapter_6.safetensors", 1.0)
    with pytest.raises(ZitError, match="use mode 'exact'"):
        adapters.ZITTrainingAdapterRemove.execute(attached, "subtract", "adapter_6.safetensors", 1.0)
    removed = adapters.ZITTrainingAdapterRemove.execute(attached, "exact", "adapter_6.safetensors", 1.0)[0]
    with pytest.raises(ZitError, match="nothing to remove"):
        adapters.ZITTrainingAdapterRemove.execute(removed, "exact", "adapter_6.safetensors", 1.0)


def test_refuses_other_models_and_sizes(base, loras):
    class NotZImage:
        model = type("M", (), {"model_config": type("C", (), {"unet_config": {"image_model": "flux"}})()})()

    with pytest.raises(ZitError, match="not Z-Image"):
        patching.model_spec(NotZImage())
    big = random_lora(2, ZitSpec(dim=512, n_layers=2, n_refiner_layers=2, n_heads=4, cap_feat_dim=32),
                      keys=[("L00", "w2")])
    writing.write_lora(big, loras.folder / "big.safetensors")
    with pytest.raises(ZitError, match="layers.0.feed_forward.w2"):
        adapters.ZITTrainingAdapterAttach.execute(base, "big.safetensors", 1.0)


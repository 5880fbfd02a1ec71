"""ZIT inference nodes in a real ComfyUI (in-process, CPU): adapters, block weights, merge/inspect/convert.

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
The model is ComfyUI's own Z-Image NextDiT at toy sizes (dim 256) wrapped in a ModelPatcher, holding the
weights of a diffusers ZImageTransformer2DModel of the same sizes (except t_embedder, whose shape differs
below dim 1024). Patched weights are read the way sampling gets them: ModelPatcher.patch_model().

What core ComfyUI does with a kohya/musubi file (`lora_unet_layers_N_attention_to_q`): its key map knows
`lora_unet_` + ComfyUI names only, so it loads the modules whose diffusers and ComfyUI names coincide
(feed_forward.w1/w2/w3, adaLN_modulation.0, cap_embedder.1) and logs "lora key not loaded" for q, k, v, out
and the renamed BASE modules (ComfyUI issue #11487); our loader patches all of them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT = host.find_comfyui()
if ROOT is None:
    pytest.skip(host.skip_reason(), allow_module_level=True)

PACK = host.setup(ROOT)

import folder_paths  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from zit_trainer_pack.nodes import ZitExtension, adapters, lora_nodes, patching  # noqa: E402
from zit_trainer_pack.trainer.errors import ZitError  # noqa: E402
from zit_trainer_pack.trainer.lora import formats, writing  # noqa: E402
from zit_trainer_pack.trainer.lora.canonical import Lora  # noqa: E402
from zit_trainer_pack.trainer.lora.inspect import heatmap_png, stats_table  # noqa: E402
from zit_trainer_pack.trainer.lora.spec import BASE, ZitSpec, comfy_name, diffusers_name  # noqa: E402
from zit_trainer_pack.trainer.lora.synth import random_lora  # noqa: E402
from zit_trainer_pack.trainer.model import build_transformer, to_comfy_state_dict  # noqa: E402

import nodes as core_nodes  # noqa: E402

SPEC = ZitSpec(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=32, in_channels=16)
# Every module ComfyUI's toy NextDiT has at the LoRA's shape (its t_embedder is narrower, see the docstring).
KEYS = [k for k in SPEC.module_keys() if not k[1].startswith("t_embedder")]
DIALECTS = formats.DIALECTS


def diffusers_model(spec: ZitSpec = SPEC, std: float = 0.05) -> torch.nn.Module:
    """The diffusers transformer at `spec` with seeded weights."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(0)
        model = build_transformer(spec, device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * std)
    return model.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _like_comfyui():
    """Nodes execute under torch.inference_mode() in ComfyUI; so do these tests."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def dmodel():
    return diffusers_model()


@pytest.fixture(scope="module")
def base(dmodel):
    return host.comfy_model(SPEC, to_comfy_state_dict(dmodel.state_dict()))


@pytest.fixture(scope="module")
def base_bf16(dmodel):
    return host.comfy_model(SPEC, to_comfy_state_dict(dmodel.state_dict()), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A fresh loras folder as ComfyUI's only one; yields a writer: (file name, Lora, dialect) -> name."""
    folder = tmp_path_factory.mktemp("loras")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.pop("loras", None)

    def write(name: str, lora: Lora, dialect: str = "aitoolkit") -> str:
        writing.write_lora(lora, folder / name, dialect)
        return name

    write.folder = folder
    yield write
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


def lora_for(seed: int, rank: int = 4, keys=KEYS, dtype=torch.float32) -> Lora:
    return random_lora(rank, SPEC, keys=keys, seed=seed, dtype=dtype, std=0.05)


def state(patcher) -> dict[str, torch.Tensor]:
    return host.patched_state(patcher)


def assert_states_equal(got: dict, want: dict, keys=None) -> None:
    for k in keys or want:
        assert torch.equal(got[k], want[k]), k


def weight_key(key) -> str:
    return f"{comfy_name(key)}.weight"


def rows(key, spec=SPEC) -> slice:
    i = {"q": 0, "k": 1, "v": 2}.get(key[1]) if key[0] != BASE else None
    return slice(None) if i is None else slice(i * spec.dim, (i + 1) * spec.dim)


def core_load(model, name: str, strength: float):
    return core_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


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


# ---- (7) merge, inspect, convert ---------------------------------------------------------------------------


def deltas(lora: Lora) -> dict:
    return {k: m.delta() for k, m in lora.modules.items()}


def test_merge_save_writes_the_exact_sum(loras):
    a, b = lora_for(12, rank=4), lora_for(13, rank=2, keys=KEYS[::2])
    loras("merge_a.safetensors", a)
    loras("merge_b.safetensors", b, "kohya")
    node = lora_nodes.ZITLoraMergeSave
    saved = node.execute(mode="exact", rank=8, dialect="comfy", dtype="keep", filename_prefix="zit/merged",
                         lora_1="merge_a.safetensors", ratio_1=1.0, blocks_1="all",
                         lora_2="merge_b.safetensors", ratio_2=-0.5, blocks_2="L00=0",
                         lora_3="none", ratio_3=1.0, blocks_3="all")
    assert saved[0] == "zit/merged.safetensors"
    assert saved[0] in folder_paths.get_filename_list("loras")
    merged = formats.read_lora(loras.folder / saved[0])
    da, db = deltas(a), deltas(b)
    assert set(merged.modules) == set(KEYS)
    for key, d in deltas(merged).items():
        want = da[key] + (-0.5 * db[key] if key in db and key[0] != "L00" else 0)
        torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-5, msg=str(key))

    first = (loras.folder / saved[0]).read_bytes()
    again = node.execute(mode="svd", rank=2, dialect="aitoolkit", dtype="bf16", filename_prefix="zit/merged",
                         lora_1="merge_b.safetensors", ratio_1=1.0, blocks_1="all")
    assert again[0] == "zit/merged_001.safetensors"
    assert (loras.folder / saved[0]).read_bytes() == first
    resized = formats.read_lora(loras.folder / again[0])
    assert resized.ranks() == {2}
    for key, d in deltas(resized).items():
        torch.testing.assert_close(d, db[key], atol=2e-3, rtol=2e-2, msg=str(key))
    assert not [p for p in loras.folder.rglob("*") if ".tmp" in p.name]


def test_merge_refuses_bad_input(loras):
    loras("merge_c.safetensors", lora_for(14))
    node = lora_nodes.ZITLoraMergeSave
    for prefix in ("../outside", "/abs/path", "C:/x", "a//b", ""):
        with pytest.raises(ZitError, match="filename_prefix"):
            node.execute(mode="exact", rank=4, dialect="aitoolkit", dtype="keep", filename_prefix=prefix,
                         lora_1="merge_c.safetensors", ratio_1=1.0, blocks_1="all")
    assert sorted(p.name for p in loras.folder.parent.iterdir() if p.name == "outside") == []
    with pytest.raises(ZitError, match="L99"):
        node.execute(mode="exact", rank=4, dialect="aitoolkit", dtype="keep", filename_prefix="x",
                     lora_1="merge_c.safetensors", ratio_1=1.0, blocks_1="L99=0")


def test_inspect_outputs_image_and_table(loras):
    lora = lora_for(15)
    name = loras("inspect.safetensors", lora, "diffsynth")
    image, table = lora_nodes.ZITLoraInspect.execute(name, "erank")
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    read = formats.read_lora(loras.folder / name)
    png = torch.from_numpy(np.asarray(heatmap_png(read, None, "erank"), dtype=np.float32)) / 255
    assert torch.equal(image[0], png)
    assert table == stats_table(read)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_convert_round_trips(loras, dialect):
    lora = lora_for(16)
    name = loras(f"convert_src_{dialect}.safetensors", lora, "kohya")
    saved = lora_nodes.ZITLoraConvert.execute(name, dialect, "keep", "")[0]
    assert saved == f"convert_src_{dialect}_{dialect}.safetensors"
    back = formats.read_lora(loras.folder / saved)
    assert back.metadata["zit.format"] == dialect
    want = deltas(lora)
    assert set(back.modules) == set(want)
    for key, d in deltas(back).items():
        torch.testing.assert_close(d, want[key], atol=1e-7, rtol=1e-6, msg=str(key))


# ---- the pack as ComfyUI sees it -----------------------------------------------------------------------


def test_every_node_is_described(loras):
    import asyncio

    node_list = asyncio.run(ZitExtension().get_node_list())
    ids = [cls.GET_SCHEMA().node_id for cls in node_list]
    assert len(set(ids)) == len(ids) and all(i.startswith("ZIT") for i in ids)
    assert {"ZITTrainingAdapterAttach", "ZITTrainingAdapterRemove", "ZITDistillPatchAttach",
            "ZITDistillPatchRemove", "ZITLoraLoaderBlockWeight", "ZITLoraMergeSave", "ZITLoraInspect",
            "ZITLoraConvert"} <= set(ids)
    for cls in node_list:
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("ZIT") and schema.description, schema.node_id
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        assert all(o.tooltip for o in schema.outputs), schema.node_id
        assert cls.GET_NODE_INFO_V1()["input"]["required"], schema.node_id  # what /object_info serves


def test_executes_as_comfyui_calls_it(base, loras):
    """execute on ComfyUI's locked class clone (no instance state): the adapter nodes share one base class."""
    from comfy_api.internal import make_locked_method_func

    loras("adapter_locked.safetensors", lora_for(18))

    def call(cls, **inputs):
        cls.VALIDATE_CLASS()
        return make_locked_method_func(cls, "EXECUTE_NORMALIZED", cls.PREPARE_CLASS_CLONE(None))(**inputs)

    attached = call(adapters.ZITTrainingAdapterAttach, model=base, lora_name="adapter_locked.safetensors",
                    strength=1.0)
    assert set(patching.attachments(attached.result[0])) == {"training_adapter"}
    removed = call(adapters.ZITTrainingAdapterRemove, model=attached.result[0], mode="exact",
                   lora_name="adapter_locked.safetensors", strength=1.0)
    assert removed.result[0].patches == {}
    assert lora_nodes.DIALECTS == formats.DIALECTS
    from zit_trainer_pack.trainer.lora.inspect import METRICS

    assert set(lora_nodes.METRICS) <= set(METRICS)


def test_importing_the_pack_is_light():
    """ComfyUI start-up: the pack and its schemas load without the engine, diffusers or peft (the job registry
    imports only trainer.job, which imports nothing but the standard library)."""
    code = "\n".join([
        "import asyncio, sys",
        "sys.path.insert(0, sys.argv[1])",
        "import _comfy_inproc as h",
        "h.prepare(h.Path(sys.argv[2]))",
        "pack = h.load_pack()",
        "extension = asyncio.run(pack.comfy_entrypoint())",
        "schemas = [c.GET_SCHEMA() for c in asyncio.run(extension.get_node_list())]",
        "heavy = ('zit_trainer_pack.trainer', 'zit_trainer_pack.nodes.patching', 'diffusers', 'peft')",
        "light = {'zit_trainer_pack.trainer' + m for m in ('', '.errors', '.job')}",
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy) and m not in light)",
        "print(len(schemas), 'schemas; heavy modules loaded:', loaded)",
        "sys.exit(1 if loaded or len(schemas) < 8 else 0)",
    ])
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

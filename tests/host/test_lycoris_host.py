"""LyCORIS files (LoKr, LoHa, full diff) through the ZIT nodes in a real ComfyUI (in-process, CPU).

The reference is core ComfyUI's own loading of the same file: `comfy.lora.model_lora_keys_unet` +
`comfy.lora.load_lora` + `add_patches`, what LoraLoaderModelOnly does. The files are synthetic, with the
tensor names real producers write for Z-Image:
- aitoolkit: `diffusion_model.layers.N.attention.to_q.lokr_w1` (diffusers names; ComfyUI maps them);
- comfy: `diffusion_model.layers.N.attention.qkv.lokr_w1` (ComfyUI's fused qkv, what its trainer writes);
- lycoris: `lycoris_layers_N_attention_to_q.hada_w1_a` (LyCORIS / SimpleTuner);
- musubi: `lora_unet_layers_N_attention_to_q.lokr_w1`: core maps `lora_unet_` + ComfyUI names only, so it
  drops q/k/v/out and the renamed BASE modules ("lora key not loaded"); the pack patches them.
The model is ComfyUI's Z-Image NextDiT at toy sizes (dim 256) with seeded random weights.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from _patching_helpers import KEYS, SPEC  # noqa: E402  (the toy model's spec; its modules ComfyUI patches)
from _patching_helpers import _like_comfyui as _like_comfyui  # a fixture (autouse here)  # noqa: E402
from zit_trainer_pack.nodes import adapters, lora_nodes, patching  # noqa: E402
from zit_trainer_pack.trainer.errors import ZitError  # noqa: E402
from zit_trainer_pack.trainer.lora.lycoris import read_delta_file  # noqa: E402
from zit_trainer_pack.trainer.lora.spec import QKV_SLICE, ZitSpec, comfy_name, diffusers_name  # noqa: E402

PRODUCERS = ("aitoolkit", "comfy", "lycoris", "musubi")
KINDS = ("lokr", "loha", "full")


@pytest.fixture(scope="module")
def base():
    return host.comfy_model(SPEC, {}, seed=3)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A fresh loras folder as ComfyUI's only one; yields it."""
    folder = tmp_path_factory.mktemp("lycoris_loras")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.pop("loras", None)
    yield folder
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


# ---- synthetic files --------------------------------------------------------------------------------------


def targets(producer: str) -> list[tuple[str, tuple[int, int]]]:
    """(module prefix, dW shape) of every module a producer writes, in its naming."""
    out = []
    for key in KEYS:
        if producer == "comfy":
            if key[1] in ("k", "v"):
                continue
            shape = (3 * SPEC.dim, SPEC.dim) if key[1] == "q" else SPEC.shape(key)
            out.append((f"diffusion_model.{comfy_name(key)}", shape))
            continue
        flat = diffusers_name(key).replace(".", "_")
        name = {"aitoolkit": f"diffusion_model.{diffusers_name(key)}", "lycoris": f"lycoris_{flat}",
                "musubi": f"lora_unet_{flat}"}[producer]
        out.append((name, SPEC.shape(key)))
    return out


def _split(n: int, big: int) -> int:
    """LoKr w1's rows for a dW of n rows: n / big when big divides n (w2 gets `big` rows), else n's least
    factor."""
    if n % big == 0 and n >= 2 * big:
        return n // big
    return next(f for f in range(2, n + 1) if n % f == 0)


def module_tensors(kind: str, prefix: str, shape: tuple[int, int], i: int, gen: torch.Generator,
                   w2_rows: int = 64) -> dict[str, torch.Tensor]:
    """One module's tensors; the variant (full/decomposed factors, Tucker, alpha) cycles with i."""
    out, inp = shape

    def rnd(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * std

    alpha = {f"{prefix}.alpha": torch.tensor(2.0 + i % 3)}
    if kind == "full":
        return {f"{prefix}.diff": rnd(out, inp, std=0.01)}
    r = 4
    if kind == "loha":
        tucker = i % 4 == 3  # Tucker cores (LyCORIS' use_tucker): hada_wN_a is then (rank, out)
        t = {}
        for n in (1, 2):
            t[f"{prefix}.hada_w{n}_a"] = rnd(r, out, std=0.3) if tucker else rnd(out, r, std=0.2)
            t[f"{prefix}.hada_w{n}_b"] = rnd(r, inp, std=0.3 if tucker else 0.2)
            if tucker:
                t[f"{prefix}.hada_t{n}"] = rnd(r, r, 1, 1, std=0.5)
        return {**t, **alpha}
    a, c = _split(out, w2_rows), _split(inp, 64)
    b, d = out // a, inp // c
    w1 = ({f"{prefix}.lokr_w1": rnd(a, c, std=0.3)} if i % 3 != 2 else
          {f"{prefix}.lokr_w1_a": rnd(a, 2, std=0.3), f"{prefix}.lokr_w1_b": rnd(2, c, std=0.3)})
    w2 = ({f"{prefix}.lokr_w2": rnd(b, d, std=0.1)} if i % 3 == 0 else
          {f"{prefix}.lokr_w2_a": rnd(b, r, std=0.1), f"{prefix}.lokr_w2_b": rnd(r, d, std=0.1)})
    return {**w1, **w2, **alpha}


def write_file(folder: Path, name: str, kind: str, producer: str, seed: int = 0, dtype=torch.float32,
               w2_rows: int = 64, drop=()) -> str:
    """A synthetic LyCORIS file in the loras folder; `drop`: substrings of module prefixes left out."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (prefix, shape) in enumerate(targets(producer)):
        rows = w2_rows if prefix.endswith("attention.qkv") else 64
        tensors = module_tensors(kind, prefix, shape, i, gen, rows)
        if not any(d in prefix for d in drop):
            sd.update({k: v.to(dtype) if v.ndim else v for k, v in tensors.items()})
    # the toy model's sizes, as the pack writes them (a file without them is read at Z-Image's full size)
    safetensors.torch.save_file(sd, str(folder / name), metadata={"zit.spec": json.dumps(SPEC.to_dict())})
    return name


# ---- helpers ----------------------------------------------------------------------------------------------


def state(patcher) -> dict[str, torch.Tensor]:
    return host.patched_state(patcher)


def core_patch(model, path: Path, strength: float):
    """Core ComfyUI's loading of a file: its Z-Image key map, load_lora, add_patches."""
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(model.model, {}))
    clone = model.clone()
    clone.add_patches(patches, strength)
    return clone


def ours(model, name: str, strength: float = 1.0, blocks: str = "all", components: str = ""):
    return lora_nodes.ZITLoraLoaderBlockWeight.execute(model, name, strength, blocks, components)[0]


def assert_equal_states(got: dict, want: dict) -> None:
    bad = [k for k in want if not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} weights differ, e.g. {bad[:3]}"


def rows(key) -> slice:
    i = QKV_SLICE.get(key[1]) if key[0] != "BASE" else None
    return slice(None) if i is None else slice(i * SPEC.dim, (i + 1) * SPEC.dim)


def weight_key(key) -> str:
    return f"{comfy_name(key)}.weight"


# ---- (1) at weight 1: exactly core's patches ----------------------------------------------------------


@pytest.mark.parametrize("producer", ["aitoolkit", "comfy", "lycoris"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_weights_as_core(base, loras, caplog, kind, producer):
    dtype = torch.bfloat16 if kind == "lokr" and producer == "aitoolkit" else torch.float32
    name = write_file(loras, f"{kind}_{producer}.safetensors", kind, producer, seed=1, dtype=dtype)
    with caplog.at_level(logging.WARNING):
        core = core_patch(base, loras / name, 1.0)
    assert "lora key not loaded" not in caplog.text  # core reads every tensor of these names
    mine = ours(base, name)
    got, want, clean = state(mine), state(core), state(base)
    assert_equal_states(got, want)
    assert set(mine.patches) == set(core.patches)
    qkv = mine.patches[f"diffusion_model.{weight_key(('L00', 'q'))}"]
    assert len(qkv) == (1 if producer == "comfy" else 3)  # one fused patch, or q/k/v row patches
    for key in KEYS:  # every module changed its weight (the comparison above is not vacuous)
        assert not torch.equal(got[weight_key(key)][rows(key)], clean[weight_key(key)][rows(key)]), key


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_musubi_names_core_drops(base, loras, caplog, kind):
    """musubi's raw `lora_unet_layers_N_attention_to_q` names: core skips them, the pack applies them."""
    name = write_file(loras, f"{kind}_musubi.safetensors", kind, "musubi", seed=2)
    same = write_file(loras, f"{kind}_musubi_as_aitoolkit.safetensors", kind, "aitoolkit", seed=2)
    with caplog.at_level(logging.WARNING):
        core = state(core_patch(base, loras / name, 1.0))
    assert "lora key not loaded: lora_unet_layers_0_attention_to_q" in caplog.text
    mine = state(ours(base, name))
    clean = state(base)
    assert_equal_states(mine, state(core_patch(base, loras / same, 1.0)))  # same tensors, names core reads
    dropped = 0
    for key in KEYS:
        k, r = weight_key(key), rows(key)
        assert not torch.equal(mine[k][r], clean[k][r]), key
        if diffusers_name(key) == comfy_name(key):  # feed_forward.*, adaLN_modulation.0, cap_embedder.1
            assert torch.equal(core[k][r], mine[k][r]), key
        else:  # q/k/v/out and the renamed BASE modules: core leaves them at the model's weights
            assert torch.equal(core[k][r], clean[k][r]), key
            dropped += 1
    assert dropped == 6 * 4 + 3  # q, k, v, out of the 6 blocks; x_embedder and final_layer's 2 Linears


# ---- (2) block / component weight 0 == the keys deleted --------------------------------------------------


@pytest.mark.parametrize(("kind", "producer"),
                         [("lokr", "aitoolkit"), ("loha", "comfy"), ("full", "lycoris"), ("lokr", "comfy")])
def test_zero_weight_equals_deleted_keys(base, loras, kind, producer):
    name = write_file(loras, f"zero_{kind}_{producer}.safetensors", kind, producer, seed=3)
    drop = ("layers.1.", "layers_1_", "noise_refiner.0.", "noise_refiner_0_", "adaLN_modulation.0",
            "adaLN_modulation_0")
    deleted = write_file(loras, f"zero_{kind}_{producer}_deleted.safetensors", kind, producer, seed=3,
                         drop=drop)
    mine = ours(base, name, 1.0, "L01=0,NR0=0", "adaLN=0")
    core = core_patch(base, loras / deleted, 1.0)
    assert_equal_states(state(mine), state(core))
    assert set(mine.patches) == set(core.patches)
    assert not any("layers.1." in k or "noise_refiner.0." in k for k in mine.patches)


def test_strength_and_block_weight_equal_core_strength(base, loras):
    name = write_file(loras, "strength_lokr.safetensors", "lokr", "comfy", seed=4)
    assert_equal_states(state(ours(base, name, 0.5, "all", "")),
                        state(core_patch(base, loras / name, 0.5)))
    assert_equal_states(state(ours(base, name, 2.0, "%default=0.25", "")),
                        state(core_patch(base, loras / name, 0.5)))


# ---- (3) different q/k/v weights on a fused qkv module: exact row patches --------------------------------


@pytest.mark.parametrize(("kind", "w2_rows"), [("lokr", 64), ("lokr", 96), ("loha", 64), ("full", 64)])
def test_fused_qkv_with_per_component_weights(base, loras, kind, w2_rows):
    """q=0.5, k=0, v=2 on ComfyUI-fused modules: each row slice equals core's patch at that strength.

    LoKr with w2 of 64 rows (divides dim 256): w1's rows are sliced; with 96 rows the slice cuts w2's row
    blocks, so it becomes a diff of the raw Kronecker rows. LoHa's rows come from its `_a` factors (one
    module in four is a Tucker LoHa, sliced on the core's other axis).
    """
    name = write_file(loras, f"fused_{kind}_{w2_rows}.safetensors", kind, "comfy", seed=5, w2_rows=w2_rows)
    mine = ours(base, name, 1.0, "all", "q=0.5,k=0,v=2")
    got, clean = state(mine), state(base)
    at = {w: state(core_patch(base, loras / name, w)) for w in (0.5, 2.0, 1.0)}
    for key in KEYS:
        k, r = weight_key(key), rows(key)
        w = {"q": 0.5, "k": 0.0, "v": 2.0}.get(key[1], 1.0)
        want = clean[k][r] if w == 0 else at[w][k][r]
        if kind == "loha" and w not in (0.0, 1.0):  # the factor rows' matmul may round differently
            torch.testing.assert_close(got[k][r], want, atol=2e-7, rtol=0, msg=str(key))
            assert not torch.equal(got[k][r], clean[k][r])
        else:
            assert torch.equal(got[k][r], want), key
    qkv = mine.patches["diffusion_model.layers.0.attention.qkv.weight"]
    assert sorted(p[3][1] for p in qkv) == [0, 2 * SPEC.dim]  # q and v rows only: k (weight 0) has no patch
    if kind == "lokr" and w2_rows == 96:
        assert all(isinstance(p[1], tuple) and p[1][0] == "diff" for p in qkv)


# ---- (4) attach -> remove is bit-exact -------------------------------------------------------------------


def test_attach_then_remove_is_bit_exact(base, loras):
    distill = write_file(loras, "distill_lokr.safetensors", "lokr", "comfy", seed=6)
    adapter = write_file(loras, "adapter_loha.safetensors", "loha", "lycoris", seed=7)
    other = write_file(loras, "other.diff.safetensors", "full", "aitoolkit", seed=8)
    before = core_patch(base, loras / other, 0.7)  # the MODEL already carries another patch file
    want = state(before)

    with_distill = adapters.ZITDistillPatchAttach.execute(before, distill, 0.8)[0]
    both = adapters.ZITTrainingAdapterAttach.execute(with_distill, adapter, 1.0)[0]
    qkv = "layers.0.attention.qkv.weight"
    assert not torch.equal(state(both)[qkv], want[qkv])
    no_distill = adapters.ZITDistillPatchRemove.execute(both, "exact", distill, 1.0)[0]
    only_adapter = adapters.ZITTrainingAdapterAttach.execute(before, adapter, 1.0)[0]
    assert_equal_states(state(no_distill), state(only_adapter))
    after = adapters.ZITTrainingAdapterRemove.execute(no_distill, "exact", adapter, 1.0)[0]
    assert_equal_states(state(after), want)
    assert set(after.patches) == set(before.patches)
    assert all([p[1] for p in after.patches[k]] == [p[1] for p in before.patches[k]] for k in before.patches)
    assert patching.attachments(after) == {}


def test_subtract_mode_cancels_a_baked_in_lokr(base, loras):
    name = write_file(loras, "baked_lokr.safetensors", "lokr", "aitoolkit", seed=9)
    clean = state(base)
    baked = host.comfy_model(SPEC, state(adapters.ZITDistillPatchAttach.execute(base, name, 1.0)[0]), seed=3)
    removed = state(adapters.ZITDistillPatchRemove.execute(baked, "subtract", name, 1.0)[0])
    for k in clean:
        torch.testing.assert_close(removed[k], clean[k], atol=1e-6, rtol=0, msg=k)


def test_fun_distill_lora_double_underscore_names(base, loras, caplog):
    """alibaba-pai's Z-Image-Fun distill LoRAs: `lora_unet__layers_N_...` (double underscore) with an alpha
    per module. Core ComfyUI loads none of it; the DistillPatch nodes apply it (as core applies the same
    tensors under names it reads, to float32 rounding: the pack folds alpha/rank into B) and remove it."""
    gen = torch.Generator().manual_seed(13)
    fun, plain = {}, {}
    for i, key in enumerate(k for k in KEYS if k[0] != "BASE"):
        out, inp = SPEC.shape(key)
        t = {".lora_down.weight": torch.randn(4, inp, generator=gen) * 0.1,
             ".lora_up.weight": torch.randn(out, 4, generator=gen) * 0.1, ".alpha": torch.tensor(1.0 + i % 5)}
        name = diffusers_name(key)
        fun.update({f"lora_unet__{name.replace('.', '_')}{s}": v for s, v in t.items()})
        plain.update({f"diffusion_model.{name}{s}": v for s, v in t.items()})
    safetensors.torch.save_file(fun, str(loras / "Z-Image-Fun-Distill-8-Steps.safetensors"))
    safetensors.torch.save_file(plain, str(loras / "fun_as_core_reads.safetensors"))
    with caplog.at_level(logging.WARNING):
        assert core_patch(base, loras / "Z-Image-Fun-Distill-8-Steps.safetensors", 0.8).patches == {}
    assert "lora key not loaded: lora_unet__layers_0_attention_to_q.lora_down.weight" in caplog.text

    attached = adapters.ZITDistillPatchAttach.execute(base, "Z-Image-Fun-Distill-8-Steps.safetensors", 0.8)[0]
    got, want = state(attached), state(core_patch(base, loras / "fun_as_core_reads.safetensors", 0.8))
    clean = state(base)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-6, msg=k)
        assert torch.equal(got[k], clean[k]) == torch.equal(want[k], clean[k]), k
    removed = adapters.ZITDistillPatchRemove.execute(attached, "exact", "", 1.0)[0]
    assert_equal_states(state(removed), clean)
    tips = " ".join(i.tooltip for i in adapters.ZITDistillPatchAttach.GET_SCHEMA().inputs)
    assert "Turbo DistillPatch: 8 steps, cfg 1" in tips and "strength 0.8, cfg 1" in tips


# ---- (5) what is refused ---------------------------------------------------------------------------------


def test_refusals_name_the_file_and_key(base, loras):
    big = ZitSpec(dim=512, n_layers=2, n_refiner_layers=2, n_heads=4, cap_feat_dim=32)
    gen = torch.Generator().manual_seed(0)
    sd = module_tensors("lokr", "diffusion_model.layers.0.feed_forward.w2", big.shape(("L00", "w2")), 0, gen)
    safetensors.torch.save_file(sd, str(loras / "big_lokr.safetensors"))
    with pytest.raises(ZitError, match="big_lokr.safetensors.*layers.0.feed_forward.w2"):
        adapters.ZITDistillPatchAttach.execute(base, "big_lokr.safetensors", 1.0)
    sd = module_tensors("loha", "diffusion_model.layers.0.feed_forward.w2", SPEC.shape(("L00", "w2")), 0, gen)
    sd["diffusion_model.layers.0.feed_forward.w2.dora_scale"] = torch.ones(SPEC.dim, 1)
    safetensors.torch.save_file(sd, str(loras / "dora_loha.safetensors"))
    with pytest.raises(ZitError, match="dora_loha.safetensors.*dora_scale.*DoRA"):
        lora_nodes.ZITLoraLoaderBlockWeight.execute(base, "dora_loha.safetensors", 1.0, "all", "")
    name = write_file(loras, "needs_rank.safetensors", "loha", "aitoolkit", seed=10)
    with pytest.raises(ZitError, match="needs_rank.safetensors: a LyCORIS file .*LoHa.*rank"):
        patching.read_lora_file(name)


# ---- (6) inspect, convert, merge ---------------------------------------------------------------------------


def test_convert_and_merge_lycoris_to_lora(loras):
    from zit_trainer_pack.trainer.lora import formats

    name = write_file(loras, "convert_loha.safetensors", "loha", "aitoolkit", seed=11)
    delta = read_delta_file(loras / name, spec=SPEC)
    saved = lora_nodes.ZITLoraConvert.execute(name, "kohya", "keep", "", 16)
    assert saved[0] == "convert_loha_kohya.safetensors"
    assert f"LoHa {len(KEYS)} -> LoRA by SVD (rank 16; kept rank 16)" in saved.ui.as_dict()["text"][0]
    back = formats.read_lora(loras / saved[0], spec=SPEC)
    assert set(back.modules) == set(delta.modules) and back.ranks() == {16}  # LoHa r=4: dW has rank <= 16
    for key, m in delta.modules.items():
        torch.testing.assert_close(back.modules[key].delta(), m.delta(), atol=1e-6, rtol=1e-5, msg=str(key))

    merged = lora_nodes.ZITLoraMergeSave.execute(mode="exact", rank=16, dialect="aitoolkit", dtype="keep",
                                                 filename_prefix="lyco_merged", lora_1=name, ratio_1=-0.5,
                                                 blocks_1="L00=0", lora_2="none", ratio_2=1.0, blocks_2="all")
    merged = formats.read_lora(loras / merged[0], spec=SPEC)
    for key, m in delta.modules.items():
        if key[0] == "L00":
            assert key not in merged.modules or merged.modules[key].delta().abs().max() == 0
        else:
            torch.testing.assert_close(merged.modules[key].delta(), -0.5 * m.delta(), atol=1e-6, rtol=1e-5)


def test_inspect_shows_lycoris_norms(loras):
    from zit_trainer_pack.trainer.lora.lycoris import module_norms
    from zit_trainer_pack.trainer.lora.spec import COMPONENTS

    name = write_file(loras, "inspect_lokr.safetensors", "lokr", "aitoolkit", seed=12)
    image, table = lora_nodes.ZITLoraInspect.execute(name, "norm")
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[3] == 3
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.std()) > 0
    delta = read_delta_file(loras / name, spec=SPEC)
    norms = module_norms(delta)
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Frobenius norm of dW"))
    end = lines.index("", start)
    grid = {line.split()[0]: line.split()[1:] for line in lines[start + 2:end]}  # block -> norm per component
    for (block, c), norm in norms.items():
        if block != "BASE":
            assert grid[block][COMPONENTS.index(c)] == f"{norm:.4g}", (block, c)
            dw = delta.modules[(block, c)].delta()
            assert norm == pytest.approx(float(torch.linalg.norm(dw.double())), rel=1e-6)
    assert f"LoKr {len(KEYS)}" in lines[0]

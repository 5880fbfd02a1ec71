"""Our reader against diffusers' Z-Image LoRA loader (diffusers 0.42), on files we write in every dialect.

Two levels:
- converter: `ZImagePipeline.lora_state_dict` (which runs `_convert_non_diffusers_z_image_lora_to_diffusers`
  for every non-diffusers layout) on full-size ZIT files; diffusers' dW = B @ A with the alpha it folds in,
  or, for the diffusers dialect, the peft `lora_adapter_metadata` scale (peft's own pattern matching).
- model: the file loaded into a small real `ZImageTransformer2DModel` with peft; every module's
  `get_delta_weight` is compared with our canonical dW.
The alphas are made non-trivial (alpha != rank, mixed ranks) so the scale semantics are exercised.

Where diffusers disagrees, the tests pin the disagreement down exactly:
- comfy (ComfyUI-native fused layout): diffusers keeps `attention.qkv.lora_down/up` (underscore spelling) as
  an `attention.qkv` module that the diffusers model does not have, and keeps ComfyUI's BASE names
  (`x_embedder`, `final_layer.*`); those are dropped with an "unexpected keys" warning, so q/k/v and those
  BASE modules are silently not loaded. `attention.out` and everything else agree. (Its dot-spelled
  `attention.qkv.lora.down` path, reached by kohya names of the ComfyUI layout, does split qkv: agrees.)
- lycoris (`lycoris_` prefix): diffusers folds the alpha but keeps the `lycoris_...` names; loading fails.
- no disagreement on alpha: a missing `.alpha` is scale 1 in both; alpha / rank otherwise.
"""

from __future__ import annotations

import json
import logging

import pytest
import safetensors.torch
import torch

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from diffusers import ZImagePipeline, ZImageTransformer2DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

from trainer.lora.canonical import Lora  # noqa: E402
from trainer.lora.formats import DIALECTS, read_lora  # noqa: E402
from trainer.lora.spec import BASE, BASE_MODULES, COMPONENTS, ZIT, ZitSpec, comfy_name, diffusers_name  # noqa: E402
from trainer.lora.synth import random_lora  # noqa: E402
from trainer.lora.writing import lora_to_state_dict  # noqa: E402

TINY = ZitSpec(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=32)
COMFY_RENAMED_BASE = {name for name, comfy in BASE_MODULES.items() if comfy != name}
KEYS = [
    *[("L00", c) for c in COMPONENTS],
    ("L01", "q"), ("L01", "k"), ("L01", "v"),
    ("NR1", "adaLN"), ("NR1", "v"),
    ("CR0", "q"), ("CR0", "out"),
    *[(BASE, name) for name in BASE_MODULES],
]
LOW_RANK = [("L00", "out"), ("L01", "k"), ("CR0", "q"), (BASE, "cap_embedder.1")]


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def mixed_lora(spec: ZitSpec = ZIT, keys=None) -> Lora:
    keys = keys or KEYS
    lora = random_lora(4, spec=spec, keys=keys, seed=11)
    lora.modules.update(random_lora(2, spec=spec, keys=[k for k in LOW_RANK if k in keys], seed=12).modules)
    return Lora(lora.modules, {}, spec)


def write_with_alphas(lora: Lora, dialect: str, path) -> None:
    """Our file in `dialect`, then alphas made non-trivial (x2, x0.5, x3 the rank, in turn) by hand."""
    sd, meta = lora_to_state_dict(lora, dialect)
    factors = [2.0, 0.5, 3.0]
    if dialect == "diffusers":
        cfg = json.loads(meta["lora_adapter_metadata"])
        r = cfg["transformer.r"]
        cfg["transformer.lora_alpha"] = 2 * r
        patterns = cfg["transformer.rank_pattern"]
        cfg["transformer.alpha_pattern"] = {p: 0.5 * rank for p, rank in patterns.items()}
        meta["lora_adapter_metadata"] = json.dumps(cfg)
    elif dialect in ("aitoolkit", "diffsynth"):  # no alpha in the dialect; both readers honour a stray one
        down = ".lora_A.default.weight" if dialect == "diffsynth" else ".lora_A.weight"
        for i, k in enumerate([k for k in sd if k.endswith(down)]):
            sd[k.removesuffix(down) + ".alpha"] = torch.tensor(sd[k].shape[0] * factors[i % 3])
    else:
        for i, k in enumerate(sorted(k for k in sd if k.endswith(".alpha"))):
            sd[k] = sd[k] * factors[i % 3]
    safetensors.torch.save_file(sd, str(path), metadata=meta)


def probe(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dW @ X for a fixed random X (16 columns) in float64: equal maps give equal probes, different ones
    differ with probability 1; it avoids building 40M-element dW matrices for every module."""
    gen = torch.Generator().manual_seed(a.shape[1])
    x = torch.randn(a.shape[1], 16, generator=gen, dtype=torch.float64)
    return (b.double() @ (a.double() @ x)) * scale


def diffusers_deltas(path) -> dict[str, torch.Tensor]:
    """diffusers module name -> dW @ X as diffusers would apply it (converter fold, or peft config scale)."""
    sd, meta = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    cfg = None
    if meta:
        kwargs = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
        cfg = LoraConfig(**kwargs)
    out = {}
    for k, a in sd.items():
        if not k.endswith(".lora_A.weight"):
            continue
        name = k.removeprefix("transformer.").removesuffix(".lora_A.weight")
        b = sd[k.replace(".lora_A.", ".lora_B.")]
        scale = 1.0
        if cfg is not None:
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), name), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
            assert r == a.shape[0]
            scale = alpha / r
        out[name] = probe(a, b, scale)
    return out


def assert_near(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape, name
    err, size = float((got.double() - want.double()).abs().max()), float(want.abs().max())
    assert err <= 1e-6 * size, f"{name}: max error {err:.3g} vs {size:.3g}"


def ours(m) -> torch.Tensor:
    return probe(m.a, m.b)


def test_spec_is_the_diffusers_model():
    """Every LoRA-targetable Linear of diffusers' ZIT transformer is a spec module, with the spec's shape."""
    with torch.device("meta"):
        model = ZImageTransformer2DModel()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    want = {diffusers_name(k): ZIT.shape(k) for k in ZIT.module_keys()}
    assert {n: tuple(m.weight.shape) for n, m in linears.items()} == want


@pytest.mark.parametrize("dialect", ["aitoolkit", "diffusers", "diffsynth", "kohya"])
def test_converter_agrees(tmp_path, dialect):
    path = tmp_path / f"{dialect}.safetensors"
    write_with_alphas(mixed_lora(), dialect, path)
    mine = read_lora(path)
    theirs = diffusers_deltas(path)
    assert set(theirs) == {diffusers_name(k) for k in mine.modules} == {diffusers_name(k) for k in KEYS}
    for key, m in mine.modules.items():
        assert_near(theirs[diffusers_name(key)], ours(m), diffusers_name(key))
    assert any(not torch.equal(mine.modules[k].b, v.b) for k, v in mixed_lora().modules.items())


def test_converter_comfy_disagreement(tmp_path):
    """diffusers cannot split ComfyUI's `attention.qkv.lora_down` and keeps ComfyUI BASE names."""
    path = tmp_path / "comfy.safetensors"
    write_with_alphas(mixed_lora(), "comfy", path)
    mine = read_lora(path)
    theirs = diffusers_deltas(path)
    fused_blocks = sorted({k[0] for k in mine.modules if k[1] in "qkv"})
    unsplit = {comfy_name((b, "q")) for b in fused_blocks} | {BASE_MODULES[n] for n in COMFY_RENAMED_BASE}
    agreed = {k for k in mine.modules if k[1] not in ("q", "k", "v") and k[1] not in COMFY_RENAMED_BASE}
    assert set(theirs) == {diffusers_name(k) for k in agreed} | unsplit
    for key in agreed:
        assert_near(theirs[diffusers_name(key)], ours(mine.modules[key]), diffusers_name(key))
    for block in fused_blocks:  # same numbers, only not split: rows q, k, v of the fused dW
        parts = [mine.modules.get((block, c)) for c in "qkv"]
        want = torch.cat([ours(m) if m is not None else torch.zeros(ZIT.dim, 16) for m in parts])
        assert_near(theirs[comfy_name((block, "q"))], want, block)
    for name in COMFY_RENAMED_BASE:
        assert_near(theirs[BASE_MODULES[name]], ours(mine.modules[(BASE, name)]), name)


def test_converter_kohya_with_comfy_names_agrees(tmp_path):
    """kohya names of the ComfyUI layout (`..._attention_qkv`) take diffusers' dot path, which splits qkv."""
    lora = mixed_lora(keys=[k for k in KEYS if k[0] != BASE])
    sd, meta = lora_to_state_dict(lora, "comfy")
    renamed = {}
    for k, v in sd.items():
        module, _, tail = k.removeprefix("diffusion_model.").partition(".lora_")
        if tail:
            renamed[f"lora_unet_{module.replace('.', '_')}.lora_{tail}"] = v
        else:
            renamed["lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".alpha").replace(".", "_")
                    + ".alpha"] = v * 2
    path = tmp_path / "kohya_comfy.safetensors"
    safetensors.torch.save_file(renamed, str(path), metadata=meta)
    mine = read_lora(path)
    assert mine.metadata["zit.format"] == "kohya"
    assert set(mine.modules) == set(lora.modules)
    theirs = diffusers_deltas(path)
    for key, m in mine.modules.items():
        assert_near(theirs[diffusers_name(key)], ours(m), diffusers_name(key))
        assert_near(ours(m), 2 * ours(lora.modules[key]), diffusers_name(key))
    # diffusers keeps every q/k/v slice of a fused module, also the zero-padded ones we drop: zero dW
    extra = set(theirs) - {diffusers_name(k) for k in mine.modules}
    assert extra == {"noise_refiner.1.attention.to_q", "noise_refiner.1.attention.to_k",
                     "context_refiner.0.attention.to_k", "context_refiner.0.attention.to_v"}
    assert all(not theirs[name].any() for name in extra)


def test_converter_lycoris_keeps_names(tmp_path):
    path = tmp_path / "lycoris.safetensors"
    write_with_alphas(mixed_lora(), "lycoris", path)
    mine = read_lora(path)
    theirs = diffusers_deltas(path)
    assert all(name.startswith("lycoris_") for name in theirs)
    assert len(theirs) == len(mine.modules)
    for key, m in mine.modules.items():  # alpha folded the same way, only the names are not mapped
        flat = "lycoris_" + diffusers_name(key).replace(".", "_")
        assert_near(theirs[flat], ours(m), flat)


def tiny_model() -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        dim=TINY.dim, n_layers=TINY.n_layers, n_refiner_layers=TINY.n_refiner_layers, n_heads=TINY.n_heads,
        n_kv_heads=TINY.n_heads, cap_feat_dim=TINY.cap_feat_dim, axes_dims=[8, 12, 12],
        axes_lens=[64, 32, 32])


def load_into_model(path) -> dict[str, torch.Tensor]:
    """diffusers module name -> dW that peft applies after diffusers' pipeline loader read the file."""
    model = tiny_model()
    sd, meta = ZImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    ZImagePipeline.load_lora_into_transformer(sd, transformer=model, adapter_name="x", metadata=meta)
    return {name: module.get_delta_weight("x").detach() for name, module in model.named_modules()
            if "x" in getattr(module, "lora_A", {})}


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")  # comfy's qkv
@pytest.mark.parametrize("dialect", DIALECTS)
def test_model_load_agrees(tmp_path, dialect):
    keys = TINY.module_keys()
    lora = random_lora(4, spec=TINY, keys=keys, seed=3)
    lora.modules.update(random_lora(2, spec=TINY, keys=keys[::5], seed=4).modules)
    path = tmp_path / f"{dialect}.safetensors"
    write_with_alphas(lora, dialect, path)
    mine = read_lora(path)
    assert mine.spec == TINY and set(mine.modules) == set(keys)
    if dialect == "lycoris":
        with pytest.raises(Exception, match="not found in the base model"):
            load_into_model(path)
        return
    theirs = load_into_model(path)
    if dialect == "comfy":
        expected = {k for k in keys if k[1] not in ("q", "k", "v") and k[1] not in COMFY_RENAMED_BASE}
    else:
        expected = set(keys)
    assert set(theirs) == {diffusers_name(k) for k in expected}
    for key in expected:
        assert_near(theirs[diffusers_name(key)], mine.modules[key].delta(), diffusers_name(key))

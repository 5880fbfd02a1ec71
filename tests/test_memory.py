"""The memory planner against real tensors: every term is checked against the bytes of real models,
adapters and optimizers on CPU; activations against what autograd really saves (exact) and against the
live-tensor peak of a real forward + backward (within 10%); then plan choice, its refusal and the CLI.

Real models: the diffusers transformer at tiny width (dim 64, 2 main layers so that a first block, whose
input needs no gradient, and a following one are both measured, 1 noise + 1 context refiner) and at ZIT's
full width (dim 3840, 1 or 2 main layers, no refiners), a few tokens, bf16 weights with fp32 LoRA under
CPU autocast, as the trainer runs them. CPU autocast keeps LayerNorm in bf16 where CUDA's runs it in fp32,
so the replay is told so.
"""

from __future__ import annotations

import dataclasses
import json
import re
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.cli import main as cli_main
from trainer.config import OptimConfig, config_from_dict
from trainer.errors import ZitError
from trainer.lora.spec import ZIT, ZitSpec
from trainer.memory import (
    Calibration,
    GiB,
    MemoryPlan,
    MemoryPlanError,
    choose_plan,
    dequant_workspace,
    estimate,
    free_vram,
    parse_vram,
)
from trainer.memory_activations import ActivationSetup, activation_peak, saved_bytes
from trainer.memory_report import format_plan_table
from trainer.memory_terms import model_shapes, quantized_weight_bytes, weight_bytes
from trainer.model import attach_frozen_adapter, build_transformer, inject_lora, predict_velocity
from trainer.model.quantize import quantize_transformer_fp8
from trainer.optim import Ema, build_optimizer
from trainer.tiny import TINY_SPEC

TINY2 = ZitSpec(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32, in_channels=16)
# Full width without refiners (the tiny cases cover them): every full-width block costs seconds on CPU.
WIDE = ZitSpec(dim=3840, n_layers=2, n_refiner_layers=0, n_heads=30, cap_feat_dim=32, in_channels=16)
WIDE1 = dataclasses.replace(WIDE, n_layers=1)
LATENT, TEXT = 8, 32  # an 8x8 latent = 16 image tokens (padded to 32); a 32-token caption
RANK = 4


def _cfg(**sections: dict) -> object:
    base = {"model": {"transformer": "tiny"}, "data": {"dataset": "images"}, "preview": {"every": 0}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages of these tensors."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _model(spec: ZitSpec, dtype: torch.dtype = torch.bfloat16, *, fp8: bool = False,
           targets: str | None = None, checkpointing: bool = False) -> torch.nn.Module:
    """A real transformer as the trainer holds it: frozen base in dtype (fp8 blocks if asked), fp32 LoRA."""
    torch.manual_seed(0)
    if spec.dim > 256:  # full width: skip the random init, values do not change any size
        model = build_transformer(spec).to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.02)
    else:
        model = build_transformer(spec, "cpu").to(dtype)
    model.requires_grad_(False)
    if fp8:
        quantize_transformer_fp8(model, dtype)
    if targets:
        inject_lora(model, RANK, float(RANK), targets)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _inputs(spec: ZitSpec) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, spec.in_channels, LATENT, LATENT, generator=gen)
    return latents, torch.tensor([0.5]), [torch.randn(TEXT, spec.cap_feat_dim, generator=gen)]


def _setup(spec: ZitSpec, targets: str, dtype: torch.dtype = torch.bfloat16, *, fp8: bool = False,
           checkpointing: bool = False) -> ActivationSetup:
    from trainer.memory_terms import lora_targets

    return ActivationSetup(batch=1, img_tokens=32, text_tokens=TEXT,
                           act_bytes=4 if dtype == torch.float32 else 2, rank=RANK,
                           lora=frozenset(lora_targets(spec, targets)),
                           checkpointing=checkpointing, fp32_layer_norm=False)


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * GiB), ("12 GiB", 12 * GiB), ("11.5G", int(11.5 * GiB)), ("12000MB", 12000 * 2**20),
    ("12000MiB", 12000 * 2**20), ("8gb", 8 * GiB), (" 24 ", 24 * GiB), ("1T", 2**40),
])
def test_parse_vram_sizes(text: str, expected: int) -> None:
    assert parse_vram(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "GB", "-3GB", "0GB", "12 G B", "twelve"])
def test_parse_vram_refuses(text: str) -> None:
    with pytest.raises(ZitError, match=re.escape(f"--vram {text}: not a size; use e.g. 12GB")):
        parse_vram(text)


def test_free_vram_is_none_without_cuda() -> None:
    assert free_vram("cpu") is None
    if not torch.cuda.is_available():
        assert free_vram("cuda") is None


# ---------------------------------------------------------------------------------------------- weights


def _weights(module: torch.nn.Module) -> int:
    return _nbytes([*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def wide() -> torch.nn.Module:
    """The full-width two-block transformer with an aitoolkit LoRA, shared (checkpointing set per test)."""
    return _model(WIDE, targets="aitoolkit")


def _checkpointing(model: torch.nn.Module, on: bool) -> torch.nn.Module:
    if on:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.rope_embedder.freqs_cis = None  # the RoPE table is built (and counted) at the next forward
    for p in model.parameters():
        p.grad = None
    return model


@pytest.fixture(scope="module")
def wide_fp8() -> tuple[torch.nn.Module, int, int]:
    """A full-width one-block transformer: its bf16 bytes, then quantized to fp8 (shared: ~4 s a block)."""
    model = _model(WIDE1)
    bf16 = _weights(model)
    quantize_transformer_fp8(model, torch.bfloat16)
    return model, bf16, _weights(model)


@pytest.mark.parametrize("spec", [TINY2, WIDE1], ids=["tiny", "full-width"])
def test_base_weights_bf16_and_fp8_match_real_models(spec: ZitSpec, request) -> None:
    if spec is WIDE1:
        model, bf16, fp8 = request.getfixturevalue("wide_fp8")
    else:
        model = _model(spec)
        bf16 = _weights(model)
        assert weight_bytes(model_shapes(spec), "bf16", "bf16")[1] == [_weights(model.layers[0])] * 2
        quantize_transformer_fp8(model, torch.bfloat16)
        fp8 = _weights(model)
    other, blocks = weight_bytes(model_shapes(spec), "bf16", "bf16")
    assert other + sum(blocks) == bf16
    other8, blocks8 = weight_bytes(model_shapes(spec), "fp8", "bf16")
    assert other8 + sum(blocks8) == fp8 < bf16 * (0.55 if spec is WIDE1 else 1)  # 98% of ZIT is in blocks
    assert blocks8[0] == _weights(model.layers[0])


def test_fp32_storage_doubles_bf16() -> None:
    model = _model(TINY2, torch.float32)
    other, blocks = weight_bytes(model_shapes(TINY2), "bf16", "fp32")
    assert other + sum(blocks) == _nbytes(model.parameters())


@pytest.mark.parametrize("shape", [(170, 64), (64, 170), (100, 33)])
def test_nf4_and_int8_bytes_match_bitsandbytes(shape: tuple[int, int]) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(*shape)
    nf4 = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                            compress_statistics=False).to("cpu")
    assert nf4.bnb_quantized
    assert nf4.nbytes + nf4.quant_state.absmax.nbytes == quantized_weight_bytes("nf4", *shape)
    int8 = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert int8.dtype == torch.int8
    assert int8.nbytes + int8.SCB.nbytes == quantized_weight_bytes("int8", *shape)


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_swap_keeps_k_blocks_resident_and_prefetch_in_flight(storage: str) -> None:
    model = _model(TINY_SPEC, fp8=storage == "fp8")
    outside = _nbytes(t for n, t in [*model.named_parameters(), *model.named_buffers()]
                      if not n.startswith("layers."))
    block = _weights(model.layers[0])
    cfg = _cfg()
    est = estimate(cfg, TINY_SPEC, MemoryPlan(storage, swap_blocks=2, prefetch=1, resolution=64))
    assert est.term("base weights").bytes == outside + 2 * block
    assert est.term("swap buffers").bytes == block
    streaming = estimate(cfg, TINY_SPEC, MemoryPlan(storage, swap_blocks=1, prefetch=1, resolution=64))
    assert streaming.term("base weights").bytes == outside + block
    assert streaming.term("swap buffers").bytes == 2 * block  # in flight + one evicted, not yet reused
    assert "2 block loads a step" in streaming.term("swap buffers").note
    whole = estimate(cfg, TINY_SPEC, MemoryPlan(storage, resolution=64))
    assert whole.term("base weights").bytes == outside + 3 * block
    assert whole.term("swap buffers").bytes == 0


# ---------------------------------------------------------------------------------------------- LoRA, optim


@pytest.mark.parametrize(("targets", "optimizer", "ema"), [
    ("aitoolkit", "adamw", True),
    ("diffsynth", "lion", False),
    (r"layers\.\d+\.attention\.to_q|all_x_embedder\.2-1|cap_embedder\.1", "adafactor", False),
])
def test_lora_grads_and_optimizer_state_match_a_real_step(targets: str, optimizer: str, ema: bool) -> None:
    custom = targets not in ("aitoolkit", "diffsynth")
    lora = {"targets": "custom", "target_regex": targets} if custom else {"targets": targets}
    cfg = _cfg(lora={"rank": RANK, "alpha": float(RANK), **lora}, optim={"optimizer": optimizer, "ema": ema})
    model = _model(TINY_SPEC, targets=targets)
    params = [p for p in model.parameters() if p.requires_grad]
    latents, t, text = _inputs(TINY_SPEC)
    with _autocast(torch.bfloat16):
        pred = predict_velocity(model, latents, t, text)
    pred.square().mean().backward()
    opt = build_optimizer(params, dataclasses.replace(OptimConfig(), optimizer=optimizer))
    opt.step()
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    est = estimate(cfg, TINY_SPEC, MemoryPlan("bf16", resolution=64))
    assert est.term("LoRA params").bytes == _nbytes(params) > 0
    assert est.term("grads").bytes == _nbytes(p.grad for p in params)
    assert est.term("optimizer state").bytes == state > 0
    if ema:
        assert est.term("EMA").bytes == sum(s.nbytes for s in Ema(params).shadow)
    else:
        assert "EMA" not in [term.name for term in est.terms]


def test_training_adapter_term_matches_the_attached_adapter(tmp_path) -> None:
    from trainer.demo import make_adapter
    from trainer.lora.formats import read_lora

    path = make_adapter(tmp_path / "adapter.safetensors")
    model = _model(TINY_SPEC, targets="aitoolkit")
    attach_frozen_adapter(model, read_lora(path))
    real = _nbytes(p for n, p in model.named_parameters() if ".adapter." in n)
    cfg = _cfg(turbo={"mode": "adapter", "adapter": str(path)})
    assert estimate(cfg, TINY_SPEC, MemoryPlan("bf16", resolution=64)).term("training adapter").bytes == real
    missing = _cfg(turbo={"mode": "adapter", "adapter": str(tmp_path / "none.safetensors")})
    term = estimate(missing, TINY_SPEC, MemoryPlan("bf16", resolution=64)).term("training adapter")
    assert term.bytes == 0 and "not counted" in term.note


# ---------------------------------------------------------------------------------------------- activations


def _measure_saved(model, spec: ZitSpec, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the storages autograd keeps after a real forward, by block (first use) and outside
    ("outer"): saved_tensors_hooks sees what ops save; with checkpointing a block keeps its inputs."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    held: dict[int, tuple[str, int]] = {}
    current, inside = ["outer"], [False]

    def keep(where: str, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in held:
            held[ptr] = (where, t.untyped_storage().nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not inside[0]:
            keep(current[0], t)
        return t

    names = {id(m): f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner", "layers")
             for i, m in enumerate(getattr(model, kind))}
    hooks = [m.register_forward_pre_hook(lambda m, a: current.__setitem__(0, names[id(m)]))
             for kind in ("noise_refiner", "context_refiner", "layers") for m in getattr(model, kind)]
    hooks += [m.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outer"))
              for kind in ("noise_refiner", "context_refiner", "layers") for m in getattr(model, kind)]
    if model.gradient_checkpointing:
        ckpt = model._gradient_checkpointing_func

        def recording(block, *args):  # noqa: ANN202
            """The checkpoint packs its inputs, kept only when a graph node holds them (output with grad)."""
            inside[0] = True
            try:
                out = ckpt(block, *args)
            finally:
                inside[0] = False
            if out.requires_grad:
                for a in args:
                    if isinstance(a, torch.Tensor):
                        keep(names[id(block)], a)
            return out

        model._gradient_checkpointing_func = recording
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(dtype):
            predict_velocity(model, *_inputs(spec))
    finally:
        for h in hooks:
            h.remove()
        if model.gradient_checkpointing:
            model._gradient_checkpointing_func = ckpt
    out: dict[str, int] = {}
    for where, n in held.values():
        out[where] = out.get(where, 0) + n
    return out


SAVED_CASES = [
    (TINY2, "aitoolkit", torch.bfloat16, False, False),
    (TINY2, "diffsynth", torch.bfloat16, True, False),
    (TINY2, "attention", torch.float32, False, False),
    (TINY2, "diffsynth", torch.float32, True, False),
    (TINY2, "aitoolkit", torch.bfloat16, False, True),
    (TINY2, "diffsynth", torch.bfloat16, True, True),
    (WIDE, "aitoolkit", torch.bfloat16, False, False),
    ("wide_fp8", "aitoolkit", torch.bfloat16, True, False),
]


@pytest.mark.parametrize(("spec", "targets", "dtype", "fp8", "ckpt"), SAVED_CASES,
                         ids=lambda v: f"dim{v.dim}x{v.n_layers}" if isinstance(v, ZitSpec) else str(v))
def test_saved_activations_are_exactly_what_autograd_saves(spec, targets, dtype, fp8, ckpt, request) -> None:
    """Tolerance 0: the replay counts the same storages, block by block."""
    if spec == "wide_fp8":  # the shared full-width fp8 block, with a LoRA now
        spec, model = WIDE1, request.getfixturevalue("wide_fp8")[0]
        inject_lora(model, RANK, float(RANK), targets)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.train()
    elif spec is WIDE:
        model = _checkpointing(request.getfixturevalue("wide"), ckpt)
    else:
        model = _model(spec, dtype, fp8=fp8, targets=targets, checkpointing=ckpt)
    measured = _measure_saved(model, spec, dtype)
    predicted = saved_bytes(model_shapes(spec), _setup(spec, targets, dtype, fp8=fp8, checkpointing=ckpt))
    assert {k: v for k, v in predicted.items() if v} == measured
    assert measured["layers.1" if spec.n_layers > 1 else "layers.0"] > 0


class LiveBytes(TorchDispatchMode):
    """The peak bytes of tensor storages alive at once, counted at each op's fresh outputs and freed when
    the storage is collected (views and in-place results are not new memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.sizes and storage.nbytes():
                    self.sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
                    self.peak = max(self.peak, self.now)
        return out


@pytest.mark.parametrize(("spec", "ckpt", "fp8"), [
    (TINY2, False, False), (TINY2, True, False), (TINY2, False, True), (TINY2, True, True),
    (WIDE, True, False),
], ids=["tiny", "tiny-ckpt", "tiny-fp8", "tiny-fp8-ckpt", "full-width-ckpt"])
def test_activation_peak_matches_the_live_tensors_of_a_real_step(spec: ZitSpec, ckpt: bool, fp8: bool,
                                                                 request) -> None:
    """Activations (+ dequantization with fp8) predicted within [measured, measured x 1.10] of the live
    tensor peak of a real forward + backward: the backward workspace is an estimate."""
    if spec is WIDE:
        model = _checkpointing(request.getfixturevalue("wide"), ckpt)
    else:
        model = _model(spec, fp8=fp8, targets="aitoolkit", checkpointing=ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)  # the step's gradients are their own term
    latents, t, text = _inputs(spec)
    target = torch.randn(latents.shape)
    tracker = LiveBytes()
    with tracker:
        with _autocast(torch.bfloat16):
            pred = predict_velocity(model, latents, t, text)
        (pred - target).square().mean().backward()
    shapes = model_shapes(spec)
    predicted = activation_peak(shapes, _setup(spec, "aitoolkit", fp8=fp8, checkpointing=ckpt))
    dequant = dequant_workspace("fp8" if fp8 else "bf16", shapes, predicted, 2).bytes
    assert tracker.peak <= predicted.act + dequant <= 1.10 * tracker.peak
    if ckpt:
        assert predicted.kept < predicted.block  # inputs only, then one block at a time


# ---------------------------------------------------------------------------------------------- choosing

ZIT_RUN = {"model": {"transformer": "zit.safetensors", "text_encoder": "te.safetensors",
                     "vae": "ae.safetensors"}, "lora": {"rank": 32}, "data": {"resolutions": [1024]}}


def _zit(**model: object) -> object:
    """The README's run: full ZIT at 1024 px, rank 32 aitoolkit, adamw, batch 1, checkpointing."""
    return _cfg(**{**ZIT_RUN, "model": {**ZIT_RUN["model"], **model}})


def _plan(cfg, storage: str, k: int = 0, res: int = 1024) -> object:
    return estimate(cfg, ZIT, MemoryPlan(storage, k, cfg.model.swap_prefetch, res))


def test_no_budget_takes_the_first_candidate() -> None:
    cfg = _zit()
    plan, tried = choose_plan(cfg, ZIT, None)
    assert plan == MemoryPlan("bf16", resolution=1024) == tried[0].plan


def test_quality_order_bf16_then_largest_swap_then_fp8_swap() -> None:
    cfg = _zit()
    bf16 = _plan(cfg, "bf16")
    assert choose_plan(cfg, ZIT, bf16.total)[0] == bf16.plan
    plan, tried = choose_plan(cfg, ZIT, bf16.total - 1)
    assert [e.plan.memory for e in tried] == ["bf16", "bf16_swap", "fp8_swap"]
    assert plan.memory == "bf16_swap" and 1 <= plan.swap_blocks < ZIT.n_layers - 1
    k = plan.swap_blocks
    assert _plan(cfg, "bf16", k).total <= bf16.total - 1 < _plan(cfg, "bf16", k + 1).total
    below_swap = _plan(cfg, "bf16", 1).total - 1
    plan, _ = choose_plan(cfg, ZIT, below_swap)
    assert plan.memory == "fp8_swap"
    k = plan.swap_blocks
    assert _plan(cfg, "fp8", k).total <= below_swap < _plan(cfg, "fp8", k + 1).total


def test_speed_order_bf16_then_fp8_then_fp8_swap() -> None:
    cfg = _zit(memory_preference="speed")
    bf16, fp8 = _plan(cfg, "bf16"), _plan(cfg, "fp8")
    assert fp8.total < bf16.total and fp8.relative_time > bf16.relative_time == 1.0
    plan, tried = choose_plan(cfg, ZIT, bf16.total - 1)
    assert plan == fp8.plan and [e.plan.memory for e in tried] == ["bf16", "fp8", "fp8_swap"]
    assert choose_plan(cfg, ZIT, fp8.total - 1)[0].memory == "fp8_swap"


def test_fixed_plans() -> None:
    assert [e.plan.name for e in choose_plan(_zit(memory="fp8"), ZIT, None)[1]] == ["fp8"]
    plan, tried = choose_plan(_zit(memory="bf16_swap", swap_blocks=5, swap_prefetch=2), ZIT, 40 * GiB)
    assert plan == MemoryPlan("bf16", 5, 2, 1024) and len(tried) == 1
    budget = _plan(_zit(), "fp8", 12).total
    assert choose_plan(_zit(memory="fp8_swap"), ZIT, budget)[0] == MemoryPlan("fp8", 12, 1, 1024)
    assert choose_plan(_zit(memory="bf16_swap"), ZIT, None)[0].swap_blocks == ZIT.n_layers - 1
    nf4, fp8 = (choose_plan(_zit(memory=m), ZIT, None)[1][0] for m in ("nf4", "fp8"))
    assert nf4.plan.name == "nf4" and nf4.term("base weights").bytes < 0.6 * fp8.term("base weights").bytes


def test_nothing_fits_names_budget_need_and_what_would_fit() -> None:
    cfg = _zit()
    smallest = _plan(cfg, "fp8", 1)
    budget = smallest.total - GiB // 4
    with pytest.raises(MemoryPlanError) as info:
        choose_plan(cfg, ZIT, budget)
    message = str(info.value)
    assert "\n" not in message and len(info.value.estimates) == 3
    assert message.startswith(f"{budget / GiB:.1f} GiB free is not enough for any plan: the smallest, "
                              f"fp8 + swap (K=1) at 1024 px, needs {smallest.total / GiB:.1f} GiB; ")
    assert re.search(r"fp8 \+ swap \(K=\d+\) at (896|768|640|512) px would fit: free memory, or allow "
                     r"model.lower_resolution$", message)
    with pytest.raises(MemoryPlanError) as fixed:
        choose_plan(_zit(memory="bf16"), ZIT, _plan(cfg, "bf16").total - 1)
    assert "fp8 + swap (K=" in str(fixed.value) and 'set model.memory = "auto"' in str(fixed.value)
    with pytest.raises(MemoryPlanError, match="lower data.batch_size, lora.rank or data.resolutions$"):
        choose_plan(cfg, ZIT, GiB)


def test_lower_resolution_steps_down_by_128() -> None:
    cfg = _zit(lower_resolution=True)
    budget = _plan(cfg, "fp8", 1).total - GiB // 4
    plan, tried = choose_plan(cfg, ZIT, budget)
    assert plan.memory == "fp8_swap" and plan.resolution in (896, 768, 640, 512)
    resolutions = sorted({e.plan.resolution for e in tried}, reverse=True)
    assert resolutions == list(range(1024, plan.resolution - 1, -128))
    assert _plan(cfg, "fp8", plan.swap_blocks, plan.resolution).total <= budget


def test_activations_scale_with_resolution_and_checkpointing() -> None:
    on = _plan(_zit(), "bf16").term("activations").bytes
    off = _plan(_zit(gradient_checkpointing=False), "bf16").term("activations").bytes
    low = _plan(_zit(), "bf16", res=512).term("activations").bytes
    assert low < on < off / 10  # 30 blocks' saved tensors vs their inputs + one block


def test_swap_time_is_hidden_at_1024_and_shows_at_512() -> None:
    cfg = _zit()
    assert _plan(cfg, "bf16", 1).step_seconds == pytest.approx(_plan(cfg, "bf16").step_seconds)
    assert _plan(cfg, "bf16", 1, 512).step_seconds > 1.02 * _plan(cfg, "bf16", res=512).step_seconds
    assert _plan(cfg, "bf16", res=512).relative_time < 0.5


def test_calibration_file_scales_activations_and_overhead(tmp_path, monkeypatch) -> None:
    cfg = _zit()
    plain = _plan(cfg, "bf16")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"activation_factor": 1.5, "overhead_gib": 1.0}))
    monkeypatch.setenv("ZIT_MEMORY_CALIBRATION", str(path))
    scaled = _plan(cfg, "bf16")
    assert scaled.term("activations").bytes == round(1.5 * plain.term("activations").bytes)
    assert scaled.term("CUDA + allocator").bytes == GiB
    given = estimate(cfg, ZIT, plain.plan, calibration=Calibration(2.0))
    assert given.term("activations").bytes == 2 * plain.term("activations").bytes
    path.write_text('{"activation_factor": -1}')
    with pytest.raises(ZitError, match="ZIT_MEMORY_CALIBRATION="):
        _plan(cfg, "bf16")


def test_table_has_a_row_per_term_and_a_column_per_plan() -> None:
    cfg = _zit()
    plan, tried = choose_plan(cfg, ZIT, 12 * GiB)
    table = format_plan_table(tried, plan, 12 * GiB)
    lines = table.splitlines()
    assert all(e.plan.name in lines[0] for e in tried) and lines[1].split() == ["1024", "px"] * 3
    for term in tried[0].terms:
        row = next(line for line in lines if line.startswith(term.name + " "))
        assert row.split()[-len(tried):] == [f"{e.term(term.name).bytes / GiB:.2f}" for e in tried]
    fits = next(line for line in lines if line.startswith("fits 12.00 GiB?")).split()[-3:]
    assert fits == ["no", "yes", "yes"]
    assert "<==" in next(line for line in lines if line.startswith("chosen"))
    assert "TFLOP/s" in table and "GB/s" in table


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_toml(tmp_path) -> str:
    path = tmp_path / "run.toml"
    path.write_text('[model]\ntransformer = "tiny"\n[data]\ndataset = "images"\nresolutions = [256]\n'
                    '[preview]\nevery = 0\n')
    return str(path)


def test_cli_plan_prints_the_table_and_the_plan(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--vram", "8GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("budget: 8.00 GiB (--vram 8GB); transformer: 3 layers, dim 64")
    assert "total (peak)" in out and "activations" in out
    assert out.rstrip().endswith('plan: bf16 at 256 px (model.memory = "bf16")')


def test_cli_plan_refuses_bad_sizes_and_too_small_budgets(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--vram", "12XB"]) == 2
    assert capsys.readouterr().err.strip() == "error: --vram 12XB: not a size; use e.g. 12GB"
    assert cli_main(["plan", "--config", run_toml, "--vram", "0.1GB"]) == 2
    captured = capsys.readouterr()
    assert "total (peak)" in captured.out
    assert captured.err.startswith("error: 0.1 GiB free is not enough for any plan: the smallest, ")


def test_cli_plan_per_card(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--card", "0.5GB, 8GB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0.5GB") and "nothing fits" in lines[0]
    assert lines[1].startswith("8GB") and "bf16 at 256 px" in lines[1]


def test_cli_plan_reads_the_spec_from_a_checkpoint_header(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from trainer.model import to_comfy_state_dict
    from trainer.tiny import tiny_transformer

    ckpt = tmp_path / "zit.safetensors"
    save_file(to_comfy_state_dict(tiny_transformer(0).state_dict(), "model.diffusion_model."), ckpt)
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\ntransformer = "{ckpt.as_posix()}"\ntext_encoder = "te.safetensors"\n'
                   'vae = "ae.safetensors"\nvram = "8GB"\n[data]\ndataset = "images"\n[preview]\nevery = 0\n')
    assert cli_main(["plan", "--config", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('budget: 8.00 GiB (model.vram = \'8GB\'); transformer: 3 layers, dim 64')
    assert cli_main(["plan", "--config", str(run).replace("run.toml", "none.toml")]) == 2


@pytest.mark.parametrize("k, fits", [(2, True), (3, False), (29, False)])
def test_a_swap_depth_the_model_cannot_hold_is_refused_naming_the_value(k: int, fits: bool) -> None:
    cfg = _cfg(model={"memory": "fp8_swap", "swap_blocks": k})  # the tiny model has 3 main blocks
    if fits:
        assert choose_plan(cfg, TINY_SPEC, None)[0].swap_blocks == k
        return
    with pytest.raises(MemoryPlanError, match=rf"^model.swap_blocks = {k}: must be between 1 and 2 "):
        choose_plan(cfg, TINY_SPEC, None)

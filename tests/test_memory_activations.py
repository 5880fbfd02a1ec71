"""The memory planner's activations against real forwards on CPU: what autograd really saves (exact, block
by block) and the live-tensor peak of a real forward + backward (within 10%), with and without gradient
checkpointing and fp8 blocks, at tiny and at full width (see _memory_helpers for the models). CPU autocast
keeps LayerNorm in bf16 where CUDA's runs it in fp32, so the replay is told so.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from _memory_helpers import RANK, TEXT, TINY2, WIDE, WIDE1, _autocast, _inputs, _model
from _memory_helpers import wide_fp8 as wide_fp8  # a fixture (module-scoped here)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer.lora.spec import ZitSpec
from trainer.memory import dequant_workspace
from trainer.memory_activations import ActivationSetup, activation_peak, saved_bytes
from trainer.memory_terms import model_shapes
from trainer.model import inject_lora, predict_velocity


def _setup(spec: ZitSpec, targets: str, dtype: torch.dtype = torch.bfloat16, *, fp8: bool = False,
           checkpointing: bool = False) -> ActivationSetup:
    from trainer.memory_terms import lora_targets

    return ActivationSetup(batch=1, img_tokens=32, text_tokens=TEXT,
                           act_bytes=4 if dtype == torch.float32 else 2, rank=RANK,
                           lora=frozenset(lora_targets(spec, targets)),
                           checkpointing=checkpointing, fp32_layer_norm=False)


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

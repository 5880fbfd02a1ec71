"""The memory planner's byte terms against real tensors on CPU: base weights (bf16, fp32, fp8, nf4/int8),
block swap buffers, LoRA params, grads, optimizer state, EMA and the frozen training adapter, each equal to
the bytes of the real models, adapters and optimizers (see _memory_helpers for the models).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _memory_helpers import RANK, TINY2, WIDE1, _autocast, _cfg, _inputs, _model, _nbytes, _weights
from _memory_helpers import wide_fp8 as wide_fp8  # a fixture (module-scoped here)

from trainer.config import OptimConfig
from trainer.lora.spec import ZitSpec
from trainer.memory import MemoryPlan, estimate
from trainer.memory_terms import model_shapes, quantized_weight_bytes, weight_bytes
from trainer.model import attach_frozen_adapter, predict_velocity
from trainer.model.quantize import quantize_transformer_fp8
from trainer.optim import Ema, build_optimizer
from trainer.tiny import TINY_SPEC

# ---------------------------------------------------------------------------------------------- weights


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

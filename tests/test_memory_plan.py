"""The memory planner's plan choice on full ZIT: quality and speed orders, fixed plans, the refusal that
names the budget, the need and what would fit, lower resolutions, scaling of activations and swap time,
the calibration file, the per-term plan table, and swap depths the model cannot hold.
"""

from __future__ import annotations

import json
import re

import pytest
from _memory_helpers import _cfg

from trainer.errors import ZitError
from trainer.lora.spec import ZIT
from trainer.memory import Calibration, GiB, MemoryPlan, MemoryPlanError, choose_plan, estimate
from trainer.memory_report import format_plan_table
from trainer.tiny import TINY_SPEC

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


@pytest.mark.parametrize("k, fits", [(2, True), (3, False), (29, False)])
def test_a_swap_depth_the_model_cannot_hold_is_refused_naming_the_value(k: int, fits: bool) -> None:
    cfg = _cfg(model={"memory": "fp8_swap", "swap_blocks": k})  # the tiny model has 3 main blocks
    if fits:
        assert choose_plan(cfg, TINY_SPEC, None)[0].swap_blocks == k
        return
    with pytest.raises(MemoryPlanError, match=rf"^model.swap_blocks = {k}: must be between 1 and 2 "):
        choose_plan(cfg, TINY_SPEC, None)

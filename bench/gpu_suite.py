"""The memory plans on one GPU: s/step, peak memory against the planner's prediction, and MFU, side by side.

The full-size Z-Image transformer with random bf16 weights (built on the GPU, no file), 1024x1024 (4096
image tokens), 512 text tokens, rank 32 on the aitoolkit targets, batch 1, gradient checkpointing, AdamW:
one row per plan (bf16, fp8, fp8 + swap K=20 and K=10, nf4 when bitsandbytes imports) through the engine's
real Trainer (the plan is handed to it, the planner's choice is skipped), beside the diffusers + peft
reference loop of bench/train_bench.py. Each row also shows the planner's predicted peak and its error, and
the suite writes the measured activation calibration factor (JSON) that trainer/memory.py reads from the
file named by ZIT_MEMORY_CALIBRATION.

Goals (H100/H200): bf16 <= 18 GB, fp8 <= 11 GB, fp8 + swap <= 7 GB at <= 1.5x the fp8 s/step, the planner
within 10% of every measured peak. Ratios are against the reference loop measured in the same run.

--dry-run runs every row on the CPU with the tiny model at 64 px for one step: it checks the code path
(the test suite runs it); its numbers mean nothing.

Run: python bench/gpu_suite.py [--steps N] [--warmup N] [--calibration out.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from train_bench import (  # noqa: E402
    GB,
    PEAK_MEASURED,
    BareLoop,
    Case,
    engine_trainer,
    peak_gb,
    random_transformer,
    reset_peak,
    seconds_per_step,
    step_flops,
)

from trainer.lora.spec import ZIT  # noqa: E402
from trainer.memory import MemoryPlan, estimate  # noqa: E402
from trainer.model import build_transformer, resolve_targets  # noqa: E402
from trainer.model.quantize import quantize_transformer  # noqa: E402
from trainer.tiny import TINY_SPEC  # noqa: E402


def plans(case: Case) -> list[MemoryPlan]:
    """The rows of the suite: every storage, and swap at two depths (K resident main blocks: 20 and 10 of
    ZIT's 30)."""
    n, size = case.spec.n_layers, case.size
    rows = [MemoryPlan("bf16", 0, 1, size), MemoryPlan("fp8", 0, 1, size),
            MemoryPlan("fp8", max(1, 2 * n // 3), 1, size), MemoryPlan("fp8", max(1, n // 3), 1, size)]
    if importlib.util.find_spec("bitsandbytes") is not None and case.device.type == "cuda":
        rows.append(MemoryPlan("nf4", 0, 1, size))
    return rows


def run_plan(case: Case, plan: MemoryPlan, steps: int, warmup: int) -> dict:
    """Time the engine's step in one plan; the peak counts from after the model was built and quantized."""
    with tempfile.TemporaryDirectory() as tmp:
        model = random_transformer(case)
        quantize_transformer(model, plan.storage, case.dtype)
        gc.collect()
        reset_peak(case.device)
        base = torch.cuda.memory_allocated(case.device) if case.device.type == "cuda" else 0
        trainer = engine_trainer(case, model, Path(tmp), plan=plan)
        seconds_per_step(trainer.train_step, warmup, case.device)
        swap = trainer.swap
        loads, copied = (swap.loads, swap.bytes_copied) if swap else (0, 0)
        sec = seconds_per_step(trainer.train_step, steps, case.device)
        predicted = estimate(trainer.cfg, case.spec, plan, text_tokens=case.text_tokens)
        row = {"plan": plan.name, "s_step": sec, "peak_gb": peak_gb(case.device),
               "predicted_gb": predicted.total / GB,
               "activations_gb": predicted.term("activations").bytes / GB,
               "base_gb": base / GB,
               "swap_loads": (swap.loads - loads) / steps if swap else 0.0,
               "swap_gb": (swap.bytes_copied - copied) / GB / steps if swap else 0.0}
        del trainer, model
    gc.collect()
    return row


def reference_row(case: Case, steps: int, warmup: int) -> dict:
    """The diffusers + peft reference loop in bf16 (train_bench's BareLoop)."""
    reset_peak(case.device)
    model = random_transformer(case)
    model.add_adapter(LoraConfig(r=case.rank, lora_alpha=case.rank, init_lora_weights=True,
                                 target_modules=resolve_targets(model, "aitoolkit")))
    latent = torch.randn(1, case.spec.in_channels, case.size // 8, case.size // 8)
    text = [torch.randn(case.text_tokens, case.spec.cap_feat_dim)]
    loop = BareLoop(case, model, latent, text)
    seconds_per_step(loop.step, warmup, case.device)
    sec = seconds_per_step(loop.step, steps, case.device)
    row = {"plan": "diffusers + peft reference (bf16)", "s_step": sec, "peak_gb": peak_gb(case.device),
           "predicted_gb": float("nan")}
    del loop, model
    gc.collect()
    return row


def calibration(rows: list[dict]) -> float:
    """The activation factor that makes the planner's bf16 prediction meet the measured bf16 peak."""
    bf16 = next(r for r in rows if r["plan"].startswith("bf16"))
    other = bf16["predicted_gb"] - bf16["activations_gb"]
    return (bf16["peak_gb"] - other) / bf16["activations_gb"]


def print_table(case: Case, rows: list[dict], n_params: int) -> None:
    flops = step_flops(case, n_params, passes=3)
    name = torch.cuda.get_device_name(case.device) if case.device.type == "cuda" else "CPU (dry run)"
    print(f"{name}: Z-Image dim {case.spec.dim} x {case.spec.n_layers} layers "
          f"({n_params / 1e9:.2f} B params, random), {case.size}x{case.size}, {case.text_tokens} text tokens,"
          f" rank {case.rank} aitoolkit, batch 1, bf16 compute, gradient checkpointing, AdamW")
    base = rows[0]["s_step"]
    fp8 = next((r["s_step"] for r in rows if r["plan"] == "fp8"), base)
    head = ("s/step", "x ref", "x fp8", "peak GB", "pred GB", "error", "MFU 790", "swap GB", "loads")
    print(f"{'plan':34} " + " ".join(f"{h:>9}" for h in head))
    for r in rows:
        known = r["predicted_gb"] == r["predicted_gb"]  # NaN for the reference loop
        err = (r["predicted_gb"] - r["peak_gb"]) / r["peak_gb"] if known else 0.0
        print(f"{r['plan']:34} {r['s_step']:9.3f} {r['s_step'] / base:9.2f} {r['s_step'] / fp8:9.2f} "
              f"{r['peak_gb']:9.2f} {r['predicted_gb']:9.2f} {err:9.1%} "
              f"{flops / r['s_step'] / PEAK_MEASURED:9.1%} {r.get('swap_gb', 0.0):9.1f} "
              f"{r.get('swap_loads', 0.0):9.1f}")
    print("swap GB and loads: per step, the blocks copied to the GPU by block swap")
    print("goals: bf16 <= 18 GB, fp8 <= 11 GB, fp8 + swap <= 7 GB at <= 1.5x fp8 s/step, |error| <= 10%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per plan (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--calibration", default="", help="write the activation calibration JSON here")
    ap.add_argument("--dry-run", action="store_true", help="every row on the CPU with the tiny model")
    args = ap.parse_args()
    if args.dry_run:
        case = Case(TINY_SPEC, 64, 16, 4, torch.bfloat16, torch.device("cpu"), True)
        args.steps, args.warmup = 1, 1
    elif not torch.cuda.is_available():
        raise SystemExit("error: the GPU suite needs a CUDA device (try --dry-run to check the code path)")
    else:
        case = Case(ZIT, 1024, 512, 32, torch.bfloat16, torch.device("cuda"), True)
    n_params = sum(p.numel() for p in build_transformer(case.spec).parameters())  # on meta: no memory
    t0 = time.perf_counter()
    rows = [reference_row(case, args.steps, args.warmup)]
    for plan in plans(case):
        rows.append(run_plan(case, plan, args.steps, args.warmup))
        print(f"  {plan.name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(case, rows, n_params)
    if case.device.type != "cuda":
        print("activation calibration: needs a CUDA peak (dry run)")
        return
    factor = calibration(rows[1:])
    print(f"activation calibration factor (measured / predicted, bf16 row): {factor:.3f}")
    if args.calibration:
        calibration_json = {"activation_factor": factor, "device": torch.cuda.get_device_name(0)}
        Path(args.calibration).write_text(json.dumps(calibration_json, indent=1))


if __name__ == "__main__":
    main()

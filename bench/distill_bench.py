"""Distill-mode cost: a distill step against an sft step through the real Trainer, and the teacher's cost.

On the tiny Z-Image model (CPU, fp32, batch 1) two real Trainers run side by side: turbo.mode = "sft"
(flow matching on the cached image latents) and turbo.mode = "distill" (distill_terms on cached teacher
trajectories of base + an SFT LoRA; trainer/distill.py). Also timed, in the same alternating rounds: one
teacher trajectory (`distill_cache.teacher_trajectories` on the distill Trainer's model with the trained
LoRA off, i.e. base + SFT; TeacherSettings.passes transformer forwards, 64 at 32 steps cfg 2), giving
seconds per teacher pass.

Printed ratios, all from medians of the same run:
- distill step / sft step (goal <= 2x);
- one cached trajectory in passes and seconds, and in distill steps;
- an online-teacher scheme such as DiffSynth's, which runs about --online-passes (default 100) teacher
  passes per training step: (online passes x s/pass + distill step) / distill step, i.e. its s/step over
  distill mode's, from pass counts, not from running that scheme;
- distill mode's amortized s/step when every trajectory is sampled once for a run of --run-steps steps
  over --trajectories trajectories (default 1000 steps, 4 captions x 4 seeds).

Run: python bench/distill_bench.py [--quick] [--steps N] [--rounds N] [--size PX] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.config import config_from_dict  # noqa: E402
from trainer.demo import make_adapter, make_dataset  # noqa: E402
from trainer.distill import TeacherSettings  # noqa: E402
from trainer.distill_cache import teacher_trajectories  # noqa: E402
from trainer.loop import TRAINED, Trainer  # noqa: E402
from trainer.model import adapters_disabled  # noqa: E402


def make_trainer(work: Path, images: Path, turbo: dict, args: argparse.Namespace) -> Trainer:
    """A real Trainer on the tiny model, fp32, batch 1, no previews, saves or health checks."""
    cfg = config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(images), "resolutions": [args.size], "min_side": 32, "caption_dropout": 0.0,
                 "cache_dir": str(work / "cache"), "batch_size": 1},
        "lora": {"rank": args.rank, "alpha": float(args.rank)},
        "turbo": turbo,
        "optim": {"lr": 1e-4, "steps": 10**6, "seed": 0},
        "save": {"output_dir": str(work / "run"), "name": "run", "every": 0},
        "preview": {"every": 0},
    }, source="bench")
    return Trainer(cfg)


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def alternate(rows: dict[str, tuple[Callable[[], object], int]], rounds: int,
              warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each row (fn, calls per round), in alternating rounds after a warm-up."""
    for fn, _ in rows.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, (fn, calls) in rows.items():
            times[name].append(seconds_per_call(fn, calls))
    return times


def bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    teacher = TeacherSettings(args.teacher_steps, args.teacher_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = make_dataset(work / "images", n=2, size=args.size)
        sft_lora = make_adapter(work / "sft.safetensors", seed=3)
        t0 = time.perf_counter()
        sft = make_trainer(work / "sft", images, {"mode": "sft"}, args)
        t1 = time.perf_counter()
        distill = make_trainer(work / "distill", images, {
            "mode": "distill", "adapter": str(sft_lora), "teacher_steps": args.teacher_steps,
            "teacher_cfg": args.teacher_cfg, "teacher_seeds": 1}, args)
        t2 = time.perf_counter()
        n_cached = len(distill.trajectories.jobs)
        job = distill.trajectories.jobs[0]
        model = distill.model

        def trajectory() -> torch.Tensor:
            was_training = model.training
            model.eval()
            try:
                with adapters_disabled(model, [TRAINED]):
                    return teacher_trajectories(model, [job.embed], distill.empty_embed, [job.seed],
                                                job.width, job.height, teacher)
            finally:
                model.train(was_training)

        rows = {"sft Trainer.train_step": (sft.train_step, args.steps),
                "distill Trainer.train_step": (distill.train_step, args.steps),
                "teacher trajectory": (trajectory, 1)}
        times = alternate(rows, args.rounds, args.warmup)
    med = {name: statistics.median(values) for name, values in times.items()}
    sft_s, distill_s, traj_s = (med[k] for k in rows)
    per_pass = traj_s / teacher.passes
    online = args.online_passes * per_pass + distill_s
    amortized = distill_s + args.trajectories * traj_s / args.run_steps
    print(f"CPU: tiny Z-Image, {args.size}x{args.size}, rank {args.rank}, batch 1, fp32, {args.threads} "
          f"thread(s); median of {args.rounds} alternating rounds of {args.steps} steps (1 trajectory) "
          f"after {args.warmup} warm-up calls")
    print(f"set-up: sft Trainer {t1 - t0:.2f} s, distill Trainer {t2 - t1:.2f} s including "
          f"{n_cached} cached teacher trajectories")
    print(f"{'row':28} {'s/call':>9} {'ratio':>7}")
    for name in rows:
        print(f"{name:28} {med[name]:9.5f} {med[name] / sft_s:7.3f}")
    print(f"distill step / sft step: {distill_s / sft_s:.2f}x (goal <= 2x)")
    print(f"teacher trajectory: {teacher.passes} passes ({teacher.steps} steps, cfg {teacher.cfg:g}), "
          f"{traj_s:.4f} s, {per_pass * 1e3:.3f} ms/pass = {traj_s / distill_s:.1f} distill steps")
    print(f"online teacher (~{args.online_passes} passes/step, DiffSynth-style): {online:.5f} s/step = "
          f"{online / distill_s:.1f}x a distill step, {online / sft_s:.1f}x an sft step")
    print(f"distill amortized over {args.run_steps} steps with {args.trajectories} trajectories: "
          f"{amortized:.5f} s/step = {amortized / sft_s:.2f}x sft; online teacher / amortized distill: "
          f"{online / amortized:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 5 steps, 1 warm-up (about 10 s)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls of each row (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="image side in px (default: %(default)s)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    ap.add_argument("--teacher-steps", type=int, default=32, help="teacher steps (default: %(default)s)")
    ap.add_argument("--teacher-cfg", type=float, default=2.0, help="teacher CFG (default: %(default)s)")
    ap.add_argument("--online-passes", type=int, default=100,
                    help="teacher passes per step of the online scheme (default: %(default)s)")
    ap.add_argument("--run-steps", type=int, default=1000, help="run length for amortizing (default: "
                    "%(default)s)")
    ap.add_argument("--trajectories", type=int, default=16, help="cached trajectories per run (default: "
                    "%(default)s)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds, args.warmup = 5, 3, 1
    bench(args)


if __name__ == "__main__":
    main()

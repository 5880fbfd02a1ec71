"""Data-parallel throughput: samples/s of 1 process against 2 processes on the same global batch.

Both runs train the tiny Z-Image model through the real CLI on the same generated images (64 px, fp32, no
previews or saves): `python -m trainer train` with data.batch_size = 2, and `torchrun --standalone
--nproc_per_node 2 -m trainer train` with data.batch_size = 1 (what `accelerate launch --multi_gpu
--num_processes 2` starts). Every process gets OMP_NUM_THREADS = --threads (default 1: one core per
process, as one GPU per process; on a shared 2-core machine more threads per process mostly wait). Each
run's speed is its own reported it/s (a rolling window over the last 20 steps, so start-up and caching are
left out) x the global batch. The two runs alternate for --rounds rounds and the medians are compared.

On a GPU machine run it with one device per process to see the real scaling; on a CPU the ratio shows
how the second process (on the second core) scales after the gradient all-reduce and its own overhead.

Run: python bench/ddp_bench.py [--steps N] [--rounds N] [--size PX] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import config_from_dict, config_to_toml  # noqa: E402
from trainer.demo import make_dataset  # noqa: E402


def write_config(path: Path, out: Path, images: Path, batch_size: int, steps: int, size: int) -> Path:
    cfg = config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(images), "resolutions": [size], "min_side": 32, "caption_dropout": 0.0,
                 "batch_size": batch_size, "drop_last": True, "cache_dir": str(out / "cache")},
        "lora": {"rank": 8, "alpha": 8.0},
        "optim": {"lr": 1e-3, "steps": steps, "seed": 0},
        "save": {"output_dir": str(out), "name": f"b{batch_size}", "every": 0, "state": False},
        "preview": {"every": 0, "health_every": 0},
    }, source="bench")
    path.write_text(config_to_toml(cfg, comments=False))
    return path


def it_per_s(stderr: str) -> float:
    """The last it/s the progress line reported."""
    found = re.findall(r"([0-9.]+) it/s", stderr)
    if not found:
        raise SystemExit(f"no progress line in the run's output:\n{stderr[-2000:]}")
    return float(found[-1])


def run(command: list[str], threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = make_dataset(root / "images", n=8, size=args.size)
        singles, pairs = [], []
        for r in range(args.rounds):  # a fresh output folder each round (runs are never overwritten)
            one = write_config(root / "one.toml", root / f"one{r}", images, 2, args.steps, args.size)
            two = write_config(root / "two.toml", root / f"two{r}", images, 1, args.steps, args.size)
            single_cmd = [sys.executable, "-m", "trainer", "train", "--config", str(one)]
            ddp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "trainer", "train", "--config", str(two)]
            singles.append(2 * it_per_s(run(single_cmd, threads=args.threads)))
            pairs.append(2 * it_per_s(run(ddp_cmd, threads=args.threads)))
            print(f"round {r + 1}: 1 process x batch 2: {singles[-1]:.1f} samples/s; "
                  f"2 processes x batch 1: {pairs[-1]:.1f} samples/s", flush=True)
    a, b = statistics.median(singles), statistics.median(pairs)
    print(f"median samples/s: 1 process {a:.1f}, 2 processes {b:.1f}; ratio 2/1 = {b / a:.2f} "
          f"({args.threads} thread(s) per process, {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()

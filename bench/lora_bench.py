"""LoRA tool speed against the I/O floor, measured side by side in one run.

(a) scale a rank-32 full-size ZIT LoRA (8 modules x 30 layers, bf16, ~170 MB) by a block vector and save it;
(b) an exact 3-way merge of such LoRAs and save it.
Each is printed as a ratio to the floor: safetensors load of the inputs + save of the output's tensors.
Run: python bench/lora_bench.py [--rank 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from trainer.lora.blocks import apply_weights, resolve  # noqa: E402
from trainer.lora.formats import read_lora  # noqa: E402
from trainer.lora.merge import merge_exact  # noqa: E402
from trainer.lora.spec import MAIN_BLOCKS, ZIT  # noqa: E402
from trainer.lora.synth import random_lora  # noqa: E402
from trainer.lora.writing import lora_to_state_dict, write_lora  # noqa: E402


def timed(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def floor(inputs: list[Path], out_sd: dict, out_path: Path) -> None:
    """The I/O floor: load every input file and save the output's tensors."""
    for p in inputs:
        load_file(p)
    save_file(out_sd, out_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    keys = [k for k in ZIT.module_keys() if k[0] in MAIN_BLOCKS]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for seed in range(3):
            path = tmp / f"in{seed}.safetensors"
            write_lora(random_lora(args.rank, keys=keys, seed=seed, dtype=torch.bfloat16), path)
            files.append(path)
        size_mb = files[0].stat().st_size / 1e6
        weights = resolve("%default=1,L00-09=0.5,L20-29=1.2", "adaLN=0.5", 0.8)

        def scale() -> None:
            write_lora(apply_weights(read_lora(files[0]), weights), tmp / "scaled.safetensors")

        def merge() -> None:
            items = [(read_lora(p), weights) for p in files]
            write_lora(merge_exact(items), tmp / "merged.safetensors")

        scaled_sd = lora_to_state_dict(apply_weights(read_lora(files[0]), weights), "aitoolkit")[0]
        merged_sd = lora_to_state_dict(merge_exact([(read_lora(p), weights) for p in files]), "aitoolkit")[0]
        rows = [
            ("scale by block vector + save", files[:1], scaled_sd, scale),
            ("exact 3-way merge + save", files, merged_sd, merge),
        ]
        print(f"rank {args.rank}, {len(keys)} modules, {size_mb:.0f} MB per input, bf16, "
              f"median of {args.repeat}")
        print(f"{'task':32} {'floor s':>8} {'ours s':>8} {'ratio':>6}")
        for name, inputs, sd, fn in rows:
            base = timed(functools.partial(floor, inputs, sd, tmp / "floor.safetensors"), args.repeat)
            ours = timed(fn, args.repeat)
            print(f"{name:32} {base:8.3f} {ours:8.3f} {ours / base:6.2f}")


if __name__ == "__main__":
    main()

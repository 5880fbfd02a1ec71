"""`python -m trainer demo`: the embedded default job, training a tiny ZIT with the adapter path on CPU.

It builds the tiny seeded model stack, generates a procedural dataset (a red circle, trigger word "zqx"),
a stand-in training adapter, trains a LoRA on top of it, and writes the LoRA, a loss-curve PNG and a
before/after preview grid (turbo, 8 steps, cfg 1, adapter removed).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {
    "blue": (70, 110, 200), "green": (80, 170, 90), "yellow": (230, 210, 90), "grey": (150, 150, 150),
}
PROMPTS = ("zqx, a red circle on a blue background", "zqx, a red circle on a yellow background")


def make_dataset(folder: Path, n: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Images of a red circle on plain backgrounds with matching captions (the concept to learn)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        image = Image.new("RGB", (size, size), BACKGROUNDS[name])
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 30, 30))
        image.save(folder / f"circle_{i:02d}.png")
        (folder / f"circle_{i:02d}.txt").write_text(f"a red circle on a {name} background")
    return folder


def make_adapter(path: Path, seed: int = 7) -> Path:
    """A stand-in for the ZIT training adapter: a small random LoRA on the tiny model (ai-toolkit style)."""
    from .lora.formats import write_lora
    from .lora.spec import MAIN_BLOCKS
    from .lora.synth import random_lora
    from .tiny import TINY_SPEC

    keys = [k for k in TINY_SPEC.module_keys() if k[0] in MAIN_BLOCKS]
    write_lora(random_lora(4, TINY_SPEC, keys, seed=seed, std=0.05), path)
    return path


def demo_config(out: Path, steps: int = 120):
    """The demo's training config: tiny model, adapter mode, 128 px, previews before and after."""
    from .config import config_from_dict

    return config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(out / "dataset"), "trigger": "zqx", "resolutions": [128], "min_side": 64,
                 "batch_size": 2, "repeats": 2, "caption_dropout": 0.05},
        "lora": {"rank": 8, "alpha": 8.0},
        "turbo": {"mode": "adapter", "adapter": str(out / "training_adapter_tiny.safetensors")},
        "optim": {"lr": 2e-3, "steps": steps, "scheduler": "cosine", "warmup_steps": 10},
        "save": {"output_dir": str(out), "name": "zqx_circle", "every": 60, "keep_last": 2},
        "preview": {"every": steps, "prompts": list(PROMPTS), "width": 128, "height": 128},
    }, source="demo")


def run_demo(out: str | Path = "demo_output", steps: int = 120) -> Path:
    """Generate, train with a progress bar, and write the LoRA, loss curve and before/after grid."""
    from .job import JobRunner
    from .loop import train
    from .progress import ProgressPrinter

    out = Path(out)
    make_dataset(out / "dataset")
    make_adapter(out / "training_adapter_tiny.safetensors")
    cfg = demo_config(out, steps)
    runner = JobRunner()
    runner.subscribe(ProgressPrinter(sys.stderr))
    t0 = time.perf_counter()
    job = runner.start("demo", lambda ctx: train(cfg, ctx))
    job.wait()
    if job.error:
        raise SystemExit(f"error: {job.error}")
    result = job.result
    run_dir = Path(cfg.run_dir)
    before, after = (Image.open(p) for p in (result.previews[0], result.previews[-1]))
    both = Image.new("RGB", (before.width, before.height + after.height), "white")
    both.paste(before, (0, 0))
    both.paste(after, (0, before.height))
    both.save(run_dir / "before_after.png")
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    print(f"trained {result.step} steps in {time.perf_counter() - t0:.0f} s; loss {first:.4f} -> {last:.4f}")
    print(f"LoRA: {result.lora_path}\nloss curve: {run_dir / 'loss.png'}\n"
          f"before (top) / after (bottom), turbo 8 steps cfg 1, adapter off: {run_dir / 'before_after.png'}")
    return result.lora_path

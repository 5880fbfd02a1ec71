"""`python -m trainer demo`: the embedded default job, training a tiny ZIT with the adapter path on CPU.

It builds the tiny seeded model stack (its VAE is the small trained autoencoder shipped in trainer/assets),
generates a procedural dataset (a red circle, trigger word "zqx"), a stand-in training adapter, trains a
LoRA on top of it, and writes the LoRA, a loss-curve PNG and a labelled before/after sheet (turbo, 8 steps,
cfg 1, training adapter removed): before training the samples are the random tiny model's colour noise,
after it they show the red circle on the prompt's background.
"""

from __future__ import annotations

import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {
    "blue": (70, 110, 200), "green": (80, 170, 90), "yellow": (230, 210, 90), "grey": (150, 150, 150),
}
CIRCLE_RED = (220, 30, 30)
PROMPTS = ("zqx, a red circle on a blue background", "zqx, a red circle on a yellow background")
DEMO_STEPS = 400
DEMO_SIZE = 128
# Every Linear of the attention, feed-forward and modulation of all blocks, plus the patch embedder and the
# final layer: the tiny base model is random and knows nothing, so the LoRA has to reach its input and output.
DEMO_TARGETS = (r"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.to_[qkv]|attention\.to_out\.0"
                r"|feed_forward\.w[123]|adaLN_modulation\.0)|all_final_layer\.2-1\.(?:linear|adaLN_modulation\.1)"
                r"|all_x_embedder\.2-1")


def make_dataset(folder: Path, n: int = 8, size: int = 128, seed: int = 0, centred: bool = False) -> Path:
    """Images of a red circle on plain backgrounds with matching captions (the concept to learn); `centred`
    keeps the circle near the middle at one size (what a few CPU steps can learn)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        image = Image.new("RGB", (size, size), BACKGROUNDS[name])
        if centred:
            r, jitter = size * 3 // 10, size // 16
            cx, cy = (size // 2 + rng.randint(-jitter, jitter) for _ in range(2))
        else:
            r = rng.randint(size // 5, size // 3)
            cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=CIRCLE_RED)
        image.save(folder / f"circle_{i:02d}.png")
        (folder / f"circle_{i:02d}.txt").write_text(f"a red circle on a {name} background")
    return folder


def make_adapter(path: Path, seed: int = 7) -> Path:
    """A stand-in for the ZIT training adapter: a small random LoRA on the tiny model (ai-toolkit style)."""
    from .lora.spec import MAIN_BLOCKS
    from .lora.synth import random_lora
    from .lora.writing import write_lora
    from .tiny import TINY_SPEC

    keys = [k for k in TINY_SPEC.module_keys() if k[0] in MAIN_BLOCKS]
    write_lora(random_lora(4, TINY_SPEC, keys, seed=seed, std=0.05), path)
    return path


def demo_config(out: Path, steps: int = DEMO_STEPS):
    """The demo's training config: tiny model, adapter mode, 128 px, rank 32 on DEMO_TARGETS, previews before
    and after; warmup and checkpoints scale with `steps`."""
    from .config import config_from_dict

    return config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(out / "dataset"), "trigger": "zqx", "resolutions": [DEMO_SIZE],
                 "min_side": 64, "batch_size": 4, "repeats": 2, "caption_dropout": 0.05},
        "lora": {"rank": 32, "alpha": 32.0, "targets": "custom", "target_regex": DEMO_TARGETS},
        "turbo": {"mode": "adapter", "adapter": str(out / "training_adapter_tiny.safetensors")},
        "optim": {"lr": 5e-3, "steps": steps, "scheduler": "cosine", "warmup_steps": min(10, steps // 10)},
        "save": {"output_dir": str(out), "name": "zqx_circle", "every": max(1, steps // 2), "keep_last": 2},
        "preview": {"every": steps, "prompts": list(PROMPTS), "width": DEMO_SIZE, "height": DEMO_SIZE},
    }, source="demo")


@contextmanager
def one_thread():
    """Run torch on one CPU thread: the tiny model's matrices are too small to gain from more, and on a
    busy machine extra threads wait on each other (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def before_after(before: Path, after: Path, steps: int) -> Image.Image:
    """The two labelled preview sheets stacked under their titles."""
    from .sheets import stack

    return stack([Image.open(before).convert("RGB"), Image.open(after).convert("RGB")],
                 ["Before training (step 0)", f"After {steps} steps: base + the trained LoRA"])


def run_demo(out: str | Path = "demo_output", steps: int = DEMO_STEPS) -> Path:
    """Generate, train with a progress bar, and write the LoRA, loss curve and before/after sheet."""
    from .job import JobRunner
    from .loop import train
    from .progress import attach_listeners

    out = Path(out)
    t0 = time.perf_counter()
    make_dataset(out / "dataset", centred=True)
    make_adapter(out / "training_adapter_tiny.safetensors")
    cfg = demo_config(out, steps)
    runner = JobRunner()
    attach_listeners(runner, cfg, sys.stderr)
    with one_thread():
        job = runner.start("demo", lambda ctx: train(cfg, ctx))
        job.wait()
    if job.error:
        raise SystemExit(f"error: {job.error}")
    result = job.result
    run_dir = Path(cfg.run_dir)
    before_after(result.previews[0], result.previews[-1], result.step).save(run_dir / "before_after.png")
    k = max(1, min(10, len(result.losses) // 2))
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    print(f"trained {result.step} steps in {time.perf_counter() - t0:.0f} s; loss {first:.4f} -> {last:.4f}")
    print(f"LoRA: {result.lora_path}\nloss curve: {run_dir / 'loss.png'}\n"
          f"before (top) / after (bottom), turbo 8 steps cfg 1, adapter off: {run_dir / 'before_after.png'}")
    return result.lora_path

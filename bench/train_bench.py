"""Training-step speed: the engine's Trainer.train_step against a hand-written loop, side by side in one run.

CPU mode (the default without CUDA) measures the engine's overhead: the tiny Z-Image model, batch 1, data
from the cache, no previews or saves. Trainer.train_step is timed against a bare torch loop on the same tiny
model with the same LoRA (peft, trainer.model.inject_lora), the same latent and text tensors, AdamW, the
same flow-matching math and gradient clipping. The two alternate in rounds (the machine may be shared) and
the median s/step of each is compared. Goal: engine overhead <= 10%.

CUDA mode (when CUDA is available) measures the real step: the full-size ZIT transformer with random bf16
weights built on the GPU (no file), 1024x1024 (latent 16x128x128, 4096 image tokens), 512 text tokens x
2560, rank 32 on the aitoolkit targets, batch 1, gradient checkpointing. It prints s/step, peak memory
(torch.cuda.max_memory_allocated) and MFU of the engine's Trainer step and of a plain diffusers + peft
reference loop (model.add_adapter(LoraConfig), torch.autocast bf16, fused AdamW, LoRA weights in fp32 as in
the engine); --compile adds the engine with torch.compile'd transformer blocks. Goal on an H100: <= 0.5
s/step and <= 20 GB. FLOP per step: 3 x forward (forward, activation backward,
checkpoint recompute), forward = 2 x parameters x tokens + attention (4 x L^2 x dim per block). MFU is given
against 989 TFLOP/s (H100/H200 SXM dense bf16 spec) and 790 TFLOP/s (an 8192^3 bf16 matmul measured on one).

--dry-run runs the CUDA-mode code on the CPU with the tiny model at 64 px for two steps: it checks the code
path without a GPU; its timings mean nothing.

Run: python bench/train_bench.py [--mode auto|cpu|cuda] [--steps N] [--compile] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402

from trainer import loop, run_models, run_setup  # noqa: E402
from trainer.config import config_from_dict  # noqa: E402
from trainer.data import LazyEncoder  # noqa: E402
from trainer.lora.spec import ZIT, ZitSpec  # noqa: E402
from trainer.memory import MemoryPlan  # noqa: E402
from trainer.model import build_transformer, inject_lora, quantize_transformer, resolve_targets  # noqa: E402
from trainer.tiny import TINY_SPEC  # noqa: E402

PEAK_SPEC = 989e12  # H100 / H200 SXM dense bf16, the datasheet number
PEAK_MEASURED = 790e12  # an 8192^3 bf16 matmul measured on one
SHIFT = 3.0  # the engine's default timestep sampler: uniform pushed by a static shift of 3
GB = 2**30


@dataclass(frozen=True)
class Case:
    """One benchmark setting: model size, image and text sizes, LoRA rank, precision and device."""

    spec: ZitSpec
    size: int  # image side in pixels (latent side = size / 8)
    text_tokens: int
    rank: int
    dtype: torch.dtype
    device: torch.device
    checkpointing: bool

    @property
    def image_tokens(self) -> int:
        return (self.size // 16) ** 2


def random_transformer(case: Case, seed: int = 0) -> torch.nn.Module:
    """A Z-Image transformer of case.spec with random weights, built directly on the device in case.dtype."""
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(case.dtype)
    try:
        model = build_transformer(case.spec, device=case.device)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def sample_tensors(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """A random latent (16, size/8, size/8) and text embedding (text_tokens, cap_feat_dim), seeded."""
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(case.spec.in_channels, case.size // 8, case.size // 8, generator=gen)
    return latent, torch.randn(case.text_tokens, case.spec.cap_feat_dim, generator=gen)


def engine_trainer(case: Case, model: torch.nn.Module, work: Path,
                   plan: MemoryPlan | None = None) -> loop.Trainer:
    """A real Trainer over `model` (already in the plan's storage) in `plan` (default: bf16, no swap); its
    one-image dataset is cached from stand-in encoders (random data)."""
    folder = work / "images"
    folder.mkdir(parents=True)
    Image.new("RGB", (case.size, case.size), (200, 60, 40)).save(folder / "sample.png")
    latent, text = sample_tensors(case)
    models = run_models.Models(model, LazyEncoder(lambda: lambda pixels: latent),
                         LazyEncoder(lambda: lambda captions: [text for _ in captions]),
                         "random", "bench-latent", "bench-text", vae_factory=None)
    cfg = config_from_dict({
        "model": {"transformer": "random", "dtype": "bf16" if case.dtype == torch.bfloat16 else "fp32",
                  "gradient_checkpointing": case.checkpointing},
        "data": {"dataset": str(folder), "caption": "bench", "resolutions": [case.size], "min_side": 16,
                 "caption_dropout": 0.0, "cache_dir": str(work / "cache")},
        "lora": {"rank": case.rank, "alpha": float(case.rank)},
        "optim": {"steps": 10**6, "lr": 1e-4},
        "save": {"output_dir": str(work), "every": 0},
        "preview": {"every": 0},
    }, source="bench")
    plan = plan or MemoryPlan("bf16", 0, 1, case.size)
    with mock.patch.object(run_setup, "pick_device", lambda name="": case.device):
        return loop.Trainer(cfg, models=lambda cfg, device, plan: models, plan=plan)


class BareLoop:
    """The hand-written reference step: flow matching on a model that already carries a trainable LoRA."""

    def __init__(self, case: Case, model: torch.nn.Module, x0: torch.Tensor, text: list[torch.Tensor]):
        self.case, self.model = case, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        for p in self.params:
            p.data = p.data.float()  # LoRA weights in fp32 under bf16 autocast, as in the engine
        cuda = case.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01,
                                           **({"fused": True} if cuda else {"foreach": True}))
        self.x0 = x0.to(case.device, torch.float32)
        self.text = [t.to(case.device, case.dtype) for t in text]
        self.generator = torch.Generator(case.device).manual_seed(0)
        if case.checkpointing:
            model.enable_gradient_checkpointing()
        model.train()

    def step(self) -> torch.Tensor:
        x0, gen = self.x0, self.generator
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        u = torch.rand(x0.shape[0], generator=gen, device=x0.device)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        noisy = ((1 - s) * x0 + s * noise).to(self.case.dtype)
        autocast = (torch.autocast(x0.device.type, dtype=self.case.dtype) if self.case.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(list(noisy.unsqueeze(2).unbind(0)), 1 - sigma, self.text, return_dict=False)[0]
        pred = -torch.stack(out).squeeze(2).float()
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Callable[[], object], steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def step_flops(case: Case, n_params: int, passes: int = 3) -> float:
    """FLOP of one LoRA training step: passes x (2 x params x tokens + attention)."""
    img, txt = case.image_tokens, case.text_tokens
    seq = img + txt
    blocks = case.spec.n_layers * seq**2 + case.spec.n_refiner_layers * (img**2 + txt**2)
    attention = 4 * case.spec.dim * blocks
    return passes * (2.0 * n_params * seq + attention)


# ---- CPU: engine overhead ------------------------------------------------------------------------------


def cpu_bench(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    case = Case(TINY_SPEC, args.size or 128, args.text_tokens or 32, args.rank or 16, torch.float32,
                torch.device("cpu"), checkpointing=False)
    steps = args.steps or 20
    with tempfile.TemporaryDirectory() as tmp:
        trainer = engine_trainer(case, random_transformer(case), Path(tmp) / "engine")
        batch = trainer.data.load_batch(trainer.data.sampler(1).next_batch())
        model = random_transformer(case)
        inject_lora(model, case.rank, float(case.rank), "aitoolkit")
        bare = BareLoop(case, model, batch.latents, batch.text_embeds)
        rows = {"bare torch loop": bare.step, "engine Trainer.train_step": trainer.train_step}
        times = alternate(rows, args, steps, case.device)
    n_lora = sum(p.numel() for p in bare.params)
    print(f"CPU: tiny Z-Image (dim {case.spec.dim}, {case.spec.n_layers} layers), {case.size}x{case.size} "
          f"({case.image_tokens} image tokens), {case.text_tokens} text tokens, rank {case.rank} "
          f"({n_lora} LoRA parameters), batch 1, fp32, {args.threads} thread(s); median of {args.rounds} "
          f"alternating rounds of {steps} steps after {args.warmup} warm-up steps")
    print_ratios(times, "bare torch loop")
    engine, bare_s = (statistics.median(times[k]) for k in ("engine Trainer.train_step", "bare torch loop"))
    print(f"engine overhead {engine / bare_s - 1:+.1%} (goal <= +10%)")
    memory_plans_bench(args, dataclasses.replace(case, checkpointing=True), steps)


def memory_plans_bench(args: argparse.Namespace, case: Case, steps: int) -> None:
    """The engine in the fp8 and fp8 + swap plans against the plain plan (all with checkpointing)."""
    k = max(1, case.spec.n_layers // 3)
    plans = {"plain (fp32 base)": MemoryPlan("bf16", 0, 1, case.size),
             "fp8 base": MemoryPlan("fp8", 0, 1, case.size),
             f"fp8 + swap (K={k})": MemoryPlan("fp8", k, 1, case.size)}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for i, (label, plan) in enumerate(plans.items()):
            model = random_transformer(case)
            quantize_transformer(model, plan.storage, case.dtype)
            rows[label] = engine_trainer(case, model, Path(tmp) / str(i), plan=plan).train_step
        times = alternate(rows, args, steps, case.device)
    print(f"memory plans on the same tiny model with gradient checkpointing ({case.spec.n_layers} main "
          "blocks; fp8 dequantizes every block Linear per pass, swap copies blocks in every step):")
    print_ratios(times, "plain (fp32 base)")


def alternate(rows: dict[str, Callable[[], object]], args: argparse.Namespace, steps: int,
              device: torch.device) -> dict[str, list[float]]:
    """s/step of each row, timed in alternating rounds after a warm-up (the machine may be shared)."""
    for step in rows.values():
        seconds_per_step(step, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, step in rows.items():
            times[name].append(seconds_per_step(step, steps, device))
    return times


def print_ratios(times: dict[str, list[float]], baseline: str) -> None:
    base = statistics.median(times[baseline])
    print(f"{'loop':28} {'s/step':>9} {'ratio':>6}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:28} {med:9.5f} {med / base:6.3f}")


# ---- CUDA: the full-size step --------------------------------------------------------------------------


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile every transformer block in place (main layers and both refiners)."""
    for blocks in (model.layers, model.noise_refiner, model.context_refiner):
        for block in blocks:
            block.compile()


def gpu_bench(args: argparse.Namespace, case: Case) -> None:
    steps, warmup = args.steps or 10, args.warmup
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        reset_peak(case.device)
        model = random_transformer(case)
        n_params = sum(p.numel() for p in model.parameters())
        trainer = engine_trainer(case, model, Path(tmp))
        batch = trainer.data.load_batch(trainer.data.sampler(1).next_batch())
        seconds_per_step(trainer.train_step, warmup, case.device)
        rows.append(("engine Trainer.train_step", seconds_per_step(trainer.train_step, steps, case.device),
                     peak_gb(case.device)))
        if args.compile:
            compile_blocks(trainer.model)
            t0, first = time.perf_counter(), max(warmup, 2)
            seconds_per_step(trainer.train_step, first, case.device)
            print(f"compiling the blocks and {first} warm-up steps took {time.perf_counter() - t0:.0f} s")
            rows.append(("engine + compiled blocks", seconds_per_step(trainer.train_step, steps, case.device),
                         peak_gb(case.device)))
        del trainer, model
        torch._dynamo.reset()  # drop compiled code that may still hold the engine's model

        reset_peak(case.device)
        model = random_transformer(case)
        model.add_adapter(LoraConfig(r=case.rank, lora_alpha=case.rank, init_lora_weights=True,
                                     target_modules=resolve_targets(model, "aitoolkit")))
        reference = BareLoop(case, model, batch.latents, batch.text_embeds)
        seconds_per_step(reference.step, warmup, case.device)
        rows.insert(0, ("diffusers + peft reference", seconds_per_step(reference.step, steps, case.device),
                        peak_gb(case.device)))

    flops = step_flops(case, n_params, passes=3 if case.checkpointing else 2)
    name = torch.cuda.get_device_name(case.device) if case.device.type == "cuda" else "CPU (dry run)"
    print(f"{name}: Z-Image dim {case.spec.dim} x {case.spec.n_layers} layers "
          f"({n_params / 1e9:.2f} B params, random), {case.size}x{case.size} "
          f"({case.image_tokens} image + {case.text_tokens} text tokens), "
          f"rank {case.rank} aitoolkit, batch 1, {str(case.dtype).removeprefix('torch.')}, gradient "
          f"checkpointing {'on' if case.checkpointing else 'off'}; {steps} steps after {warmup} warm-up")
    print(f"FLOP per step {flops:.3g} (3 passes with checkpointing); MFU against 989 TFLOP/s (spec) "
          "and 790 TFLOP/s (measured)")
    base = rows[0][1]
    header = ("s/step", "peak GB", "TFLOP/s", "MFU 989", "MFU 790")
    print(f"{'loop':28} " + " ".join(f"{h:>8}" for h in header) + f" {'ratio':>6}")
    for label, sec, peak in rows:
        achieved = flops / sec
        print(f"{label:28} {sec:8.3f} {peak:8.1f} {achieved / 1e12:8.1f} {achieved / PEAK_SPEC:8.1%} "
              f"{achieved / PEAK_MEASURED:8.1%} {sec / base:6.3f}")
    print("goal on an H100: engine <= 0.5 s/step, <= 20 GB peak")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available, else cpu (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per loop (per round on CPU); "
                    "default 20 on CPU, 10 on CUDA")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: alternating rounds (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default: %(default)s)")
    ap.add_argument("--size", type=int, default=0, help="image side in px (default 128 CPU, 1024 CUDA)")
    ap.add_argument("--text-tokens", type=int, default=0, help="text length (default 32 CPU, 512 CUDA)")
    ap.add_argument("--rank", type=int, default=0, help="LoRA rank (default 16 CPU, 32 CUDA)")
    ap.add_argument("--no-checkpointing", action="store_true", help="CUDA: gradient checkpointing off")
    ap.add_argument("--compile", action="store_true", help="CUDA: also time the engine with compiled blocks")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the CUDA-mode code on the CPU with the tiny model (checks the code path only)")
    args = ap.parse_args()
    if args.dry_run:
        args.steps = args.steps or 2
        gpu_bench(args, Case(TINY_SPEC, args.size or 64, args.text_tokens or 16, args.rank or 4,
                             torch.bfloat16, torch.device("cpu"), not args.no_checkpointing))
        return
    mode = args.mode if args.mode != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if mode == "cpu":
        cpu_bench(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("error: --mode cuda needs a CUDA device (try --dry-run to check the code path)")
    gpu_bench(args, Case(ZIT, args.size or 1024, args.text_tokens or 512, args.rank or 32, torch.bfloat16,
                         torch.device("cuda"), not args.no_checkpointing))


if __name__ == "__main__":
    main()

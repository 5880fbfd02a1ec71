"""Distill-mode turbo health (TeacherDistance) over distill runs at several learning rates (turbo fixture).

Builds the miniature distilled model (trainer.turbo_fixture), trains a plain SFT LoRA on it for 40 steps (as
tests/test_distill_proof.py does), caches its 32-step cfg-2 teacher trajectories, then for each learning rate
distills a fresh LoRA for 120 steps and prints the meter every 20 steps. A working run falls well below 1.0
(the SFT LoRA alone); a broken one (learning rate far too high) goes above it, which is what the warning at
DISTILL_WARNING = 1.0 catches.

Run: python bench/distill_health_sweep.py [LR ...]   (default 2e-3 2e-2 1e-1; about 10 s per rate on 1 thread)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_distill_proof as proof  # noqa: E402  (the proof's SFT recipe and sizes)

from trainer.distill import TeacherSettings, distill_terms  # noqa: E402
from trainer.distill_cache import teacher_trajectories  # noqa: E402
from trainer.health import TeacherDistance, TurboHealth  # noqa: E402
from trainer.model import adapters_disabled, attach_frozen_adapter, lora_from_peft  # noqa: E402
from trainer.turbo_fixture import build_turbo_fixture  # noqa: E402


def main(rates: list[float]) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    fx = build_turbo_fixture(0)
    seeds = fx.seeds[: proof.N_SEEDS]
    embeds = fx.prompt_embeds(seeds)
    sft_model = proof._with_lora(fx.fresh_model())
    proof._train_sft(fx, sft_model, TurboHealth(sft_model, embeds, seeds, proof.SIZE, proof.SIZE))
    sft = lora_from_peft(sft_model, "zit")
    teacher = TeacherSettings(32, fx.teacher_cfg)
    for lr in rates:
        student = fx.fresh_model()
        attach_frozen_adapter(student, sft, name="adapter")
        student = proof._with_lora(student).eval()
        with adapters_disabled(student, ["zit"]):
            traj = teacher_trajectories(student, embeds, fx.empty_embed, seeds, proof.SIZE, proof.SIZE,
                                        teacher)
        meter = TeacherDistance(student, traj[:4], embeds[:4], reference_disable=["zit"])
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr)
        gen = torch.Generator().manual_seed(1)
        student.train()
        curve = [meter.measure()]
        for step in range(1, 121):
            pick = torch.randint(len(seeds), (proof.BATCH,), generator=gen)
            distill_terms(student, traj[pick], [embeds[i] for i in pick.tolist()], gen).total.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 20 == 0:
                curve.append(meter.measure())
        print(f"lr {lr:g}: health at steps 0, 20, ..., 120: {', '.join(f'{h:.2f}' for h in curve)}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [2e-3, 2e-2, 1e-1])

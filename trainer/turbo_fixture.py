"""A miniature Z-Image-Turbo for tests and demos: a tiny teacher flow model and its few-step distillation.

Built reproducibly on the CPU in about 13 s (one thread) from the seeded tiny stack (`trainer.tiny`):

1. **World.** Per prompt, latents whose 2x2x16 patches (the transformer's tokens) are each drawn from a small
   per-prompt codebook. Every token is multi-modal, so the flow-matching flow of this world is curved.
2. **Teacher** (the "Z-Image base"): the tiny transformer fine-tuned, all weights, with the flow-matching
   loss on the world (20 % of captions dropped, so cfg works) for `teacher_steps` steps. It is only partly
   trained and need not be more: what matters is that it explains the world better than the turbo model
   does, as Z-Image base explains images better than ZIT does under the flow-matching loss.
3. **Turbo** (the "ZIT"): the teacher samples `n_seeds` seeds de-turbo style, 32 Euler steps at cfg 2
   (shift 3; that grid contains the 8 turbo sigmas). The block Linear weights of a copy are then trained
   with the rectified-flow ("reflow") loss on the straight line from each seed's noise to the teacher's
   sample, at sigmas near the 8 turbo sigmas. A straight flow lets the 8-step cfg-1 sampler land where the
   guided 32-step teacher does, and keeps the x0 prediction ``x - s v`` the same all along the trajectory:
   the self-consistency a distilled few-step model has, which `trainer.health` measures. cfg 2 as in ZIT's
   "de-turbo" setting: like ZIT, the fixture bakes guidance into its cfg-1 few-step sampler.
4. **Distillation** = turbo - teacher on every block Linear, as an exact full-rank `Lora`. Its negation is
   the fixture's de-distilling training adapter: turbo + `training_adapter()` is the teacher, as ZIT + the
   ZIT training adapter approximates the undistilled base.

The 8-step samples match the teacher's only on the distilled seeds; on other seeds the turbo model draws
its own (straight-flow) images, as a distribution-matching distillation such as ZIT's does. `fixture_report`
gives the numbers (tests/test_health.py prints them). Nothing is written to disk.

The adapter keeps turbo only for data the teacher already explains: train on `TurboFixture.world` latents.
With the real Trainer on `trainer.demo` images (tiny random-VAE latents, outside the world), sft and
adapter mode wear turbo down alike (health 2.9 vs 3.3 after 40 steps at lr 2e-3).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .lora.canonical import Lora, LoraModule
from .lora.spec import BASE, ModuleKey, diffusers_name
from .model import model_spec, predict_velocity
from .objective import TURBO_SIGMAS, add_noise, sample_shifted, velocity_target
from .sampling import VAE_FACTOR, SamplerSettings, initial_noise, sample_latents

if TYPE_CHECKING:
    from .config import TrainConfig
    from .memory import MemoryPlan
    from .run_models import Models, OpenModels

PROMPTS: tuple[str, ...] = ("a red fox in the snow", "a cat")
TEACHER_STEPS = 32
"""The teacher's sampler steps: their shift-3 grid contains the 8 turbo sigmas."""
PATCH = 2


@dataclass
class TurboFixture:
    """A tiny turbo model, its teacher, the distillation between them and the world both were trained on."""

    model: nn.Module  # the turbo model (teacher + distillation), frozen, eval mode
    teacher: nn.Module  # the undistilled teacher, frozen, eval mode
    distillation: Lora  # model - teacher on every block Linear (exact, full rank)
    embeds: list[torch.Tensor]  # one text embedding per prompt in `prompts`
    empty_embed: torch.Tensor  # the empty prompt's embedding
    codebooks: torch.Tensor  # (prompts, modes, 4 * channels): the world's token values per prompt
    seeds: list[int]  # the distilled seeds; seed s goes with prompt s % len(prompts)
    width: int
    height: int
    teacher_cfg: float
    prompts: tuple[str, ...] = PROMPTS
    timings: dict[str, float] = field(default_factory=dict)

    def training_adapter(self) -> Lora:
        """The de-distilling adapter: the negated distillation (model + adapter = teacher)."""
        modules = {k: LoraModule(m.a.clone(), -m.b) for k, m in self.distillation.modules.items()}
        return Lora(modules, {"zit.name": "turbo fixture training adapter"}, self.distillation.spec)

    def prompt_embeds(self, seeds: Sequence[int]) -> list[torch.Tensor]:
        """The embedding the fixture pairs with each seed: prompt `seed % len(prompts)`."""
        return [self.embeds[s % len(self.embeds)] for s in seeds]

    def world(self, n: int, prompt: int, generator: torch.Generator) -> torch.Tensor:
        """`n` fresh (n, C, H/8, W/8) latents of the world of prompt number `prompt` (training data)."""
        return world_latents(self.codebooks[prompt], n, self.width, self.height, generator)

    def fresh_model(self) -> nn.Module:
        """A private copy of the turbo model (frozen, eval mode) to put adapters on."""
        return copy.deepcopy(self.model)


def world_latents(codebook: torch.Tensor, n: int, width: int, height: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Latents (n, C, H/8, W/8) whose 2x2 patches are codebook rows (M, 4C) chosen independently per patch."""
    h, w = height // VAE_FACTOR // PATCH, width // VAE_FACTOR // PATCH
    channels = codebook.shape[1] // PATCH**2
    pick = torch.randint(codebook.shape[0], (n, h * w), generator=generator)
    tokens = codebook[pick].reshape(n, h, w, channels, PATCH, PATCH)
    return tokens.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, h * PATCH, w * PATCH)


Batch = tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]  # noisy, sigmas, texts, target


def _fit(model: nn.Module, params: list[nn.Parameter], batch: Callable[[], Batch], steps: int,
         lr: float) -> None:
    """Adam on `params` for `steps` steps of velocity MSE; leaves the model frozen in eval mode."""
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr)
    model.train()
    for _ in range(steps):
        latents, sigmas, texts, target = batch()
        loss = (predict_velocity(model, latents, sigmas, texts) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.requires_grad_(False).eval()


def _block_linears(model: nn.Module) -> dict[ModuleKey, nn.Linear]:
    spec = model_spec(model)
    return {k: model.get_submodule(diffusers_name(k)) for k in spec.module_keys() if k[0] != BASE}


def distillation_lora(model: nn.Module, teacher: nn.Module) -> Lora:
    """model - teacher on every block Linear as an exact full-rank Lora (SVD factors, float32)."""
    teacher_linears = _block_linears(teacher)
    modules = {}
    for key, linear in _block_linears(model).items():
        delta = (linear.weight - teacher_linears[key].weight).detach().double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        modules[key] = LoraModule((s[:, None] * vh).float(), u.float())
    return Lora(modules, {"zit.name": "turbo fixture distillation"}, model_spec(model))


def teacher_samples(teacher: nn.Module, embeds: Sequence[torch.Tensor], empty: torch.Tensor,
                    seeds: Sequence[int], width: int, height: int, cfg: float) -> torch.Tensor:
    """The teacher's 32-step samples of `seeds` at `cfg` (batch, C, H/8, W/8)."""
    settings = SamplerSettings("teacher", TEACHER_STEPS, cfg)
    return sample_latents(teacher, list(embeds), empty, list(seeds), width, height, settings)


def build_turbo_fixture(
    seed: int = 0,
    *,
    n_seeds: int = 16,
    modes: int = 2,
    teacher_steps: int = 100,
    distill_steps: int = 100,
    batch_size: int = 8,
    teacher_lr: float = 5e-3,
    distill_lr: float = 1e-3,
    teacher_cfg: float = 2.0,
    caption_dropout: float = 0.2,
    width: int = 64,
    height: int = 64,
) -> TurboFixture:
    """Build the turbo fixture (teacher, reflow-distilled turbo model, distillation Lora); deterministic."""
    from .tiny import tiny_text_encoder, tiny_transformer

    t0 = time.perf_counter()
    encoded = tiny_text_encoder(seed).encode([*PROMPTS, ""])
    embeds, empty = encoded[:-1], encoded[-1]
    gen = torch.Generator().manual_seed(seed + 11)
    codebooks = torch.randn(len(PROMPTS), modes, PATCH**2 * 16, generator=gen)
    teacher = tiny_transformer(seed)

    def world_batch() -> Batch:
        prompts = torch.randint(len(PROMPTS), (batch_size,), generator=gen).tolist()
        x0 = torch.cat([world_latents(codebooks[p], 1, width, height, gen) for p in prompts])
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = sample_shifted(batch_size, generator=gen)
        drop = (torch.rand(batch_size, generator=gen) < caption_dropout).tolist()
        texts = [empty if d else embeds[p] for p, d in zip(prompts, drop, strict=True)]
        return add_noise(x0, noise, sigmas), sigmas, texts, velocity_target(x0, noise)

    _fit(teacher, list(teacher.parameters()), world_batch, teacher_steps, teacher_lr)
    t1 = time.perf_counter()

    seeds = list(range(seed * 1000, seed * 1000 + n_seeds))
    seed_embeds = [embeds[s % len(embeds)] for s in seeds]
    with torch.no_grad():
        targets = teacher_samples(teacher, seed_embeds, empty, seeds, width, height, teacher_cfg)
    noises = torch.stack([initial_noise(s, width, height) for s in seeds])
    anchors = torch.tensor(TURBO_SIGMAS)

    def reflow_batch() -> Batch:
        pick = torch.randint(n_seeds, (batch_size,), generator=gen)
        jitter = (torch.rand(batch_size, generator=gen) * 2 - 1) * 0.02
        anchor = anchors[torch.randint(len(anchors), (batch_size,), generator=gen)]
        sigmas = (anchor + jitter).clamp(0.02, 1.0)
        x0, noise = targets[pick], noises[pick]
        texts = [seed_embeds[i] for i in pick.tolist()]
        return add_noise(x0, noise, sigmas), sigmas, texts, velocity_target(x0, noise)

    turbo = copy.deepcopy(teacher)
    _fit(turbo, [linear.weight for linear in _block_linears(turbo).values()], reflow_batch, distill_steps,
         distill_lr)
    t2 = time.perf_counter()
    return TurboFixture(turbo, teacher, distillation_lora(turbo, teacher), embeds, empty, codebooks, seeds,
                        width, height, teacher_cfg, timings={"teacher_s": t1 - t0, "distill_s": t2 - t1})


def open_fixture_models(fx: TurboFixture) -> OpenModels:
    """An `OpenModels` for `Trainer(cfg, models=...)`: the tiny stack of a "tiny" config with the fixture's
    turbo model as the transformer (a fresh copy per run). The Trainer's tiny text encoder is seed 0's, so
    its prompt embeddings match a seed-0 fixture's."""
    from .run_models import open_models

    def open_(cfg: TrainConfig, device: torch.device, plan: MemoryPlan) -> Models:
        models = open_models(cfg, device, plan)
        return dataclasses.replace(models, transformer=fx.fresh_model().to(device), base_id="turbo-fixture")

    return open_


@dataclass(frozen=True)
class FixtureReport:
    """How turbo the fixture is: 8-step vs teacher distances and x0 self-consistency, teacher vs turbo."""

    teacher_gap: float  # ||x8(teacher, cfg 1) - x32(teacher, cfg)|| / ||x32|| on the distilled seeds
    turbo_gap: float  # ||x8(turbo, cfg 1) - x32(teacher, cfg)|| / ||x32|| on the distilled seeds
    heldout_teacher_gap: float  # the same two on seeds the distillation never saw
    heldout_turbo_gap: float
    teacher_disagreement: float  # trainer.health x0 disagreement of the teacher (distilled seeds)
    turbo_disagreement: float  # ... and of the turbo model


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def fixture_report(fx: TurboFixture, heldout: Sequence[int] = tuple(range(500, 508))) -> FixtureReport:
    """Measure the fixture: 8-step cfg-1 samples against the teacher's 32-step ones, and x0 disagreement."""
    from .health import x0_disagreement

    turbo = SamplerSettings("turbo", 8, 1.0)
    gaps = []
    for seeds in (fx.seeds, list(heldout)):
        embeds = fx.prompt_embeds(seeds)
        ref = teacher_samples(fx.teacher, embeds, fx.empty_embed, seeds, fx.width, fx.height, fx.teacher_cfg)
        for model in (fx.teacher, fx.model):
            x8 = sample_latents(model, embeds, fx.empty_embed, seeds, fx.width, fx.height, turbo)
            gaps.append(_gap(x8, ref))
    embeds = fx.prompt_embeds(fx.seeds)
    dis = [x0_disagreement(m, embeds, fx.seeds, fx.width, fx.height).mean().item()
           for m in (fx.teacher, fx.model)]
    return FixtureReport(*gaps, *dis)

"""Distill mode on the tiny model: teacher sigma grid, trajectory cache, loss, rollout gradients, outputs."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from safetensors.torch import save_file

from trainer.distill import (
    STUDENT_GRID,
    STUDENT_SIGMAS,
    DistillError,
    TeacherSettings,
    distill_outputs,
    distill_terms,
    teacher_velocity,
)
from trainer.distill_cache import (
    TrajectoryJob,
    ensure_trajectories,
    load_trajectories,
    lora_fingerprint,
    trajectory_key,
    trajectory_path,
)
from trainer.lora.formats import read_lora
from trainer.lora.spec import diffusers_name
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora
from trainer.model import (
    adapters_disabled,
    attach_frozen_adapter,
    inject_lora,
    load_lora_into_peft,
    predict_velocity,
    resolve_targets,
)
from trainer.objective import TURBO_SIGMAS, add_noise, flow_loss, mse_per_sample, velocity_target
from trainer.sampling import TURBO, SamplerSettings, initial_noise, sample_latents
from trainer.tiny import TINY_SPEC, tiny_text_encoder, tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # px: 8x8 latents, 16 image tokens
SFT_STD = 0.2  # visible: the SFT LoRA alone moves the turbo output ~25% (relative) off the base's
TEACHER = TeacherSettings(32, 2.0, 3.0)


@pytest.fixture(scope="module")
def negative() -> torch.Tensor:
    """The empty-prompt embedding (the CFG negative)."""
    return tiny_text_encoder(0).encode([""])[0]


def student_model(sft_rank: int = 4, distill_rank: int = 8, sft_strength: float = 1.0):
    """Tiny base + frozen random SFT LoRA ("adapter") + trainable zero-init distill LoRA ("zit")."""
    model = tiny_transformer(0)
    names = set(resolve_targets(model, "diffsynth"))
    keys = [k for k in TINY_SPEC.module_keys() if diffusers_name(k) in names]
    sft = random_lora(sft_rank, TINY_SPEC, keys, seed=1, std=SFT_STD)
    attach_frozen_adapter(model, sft, sft_strength, name="adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject_lora(model, distill_rank, distill_rank, "diffsynth", adapter_name="zit")
    return model, sft


def randomize_distill(model: torch.nn.Module, std: float = 0.05, seed: int = 3) -> None:
    """Give the distill LoRA's B (zero at init) seeded random values: the student differs from the teacher."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.zit" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ---- teacher settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [8, 16, 32, 48])
def test_teacher_grid_contains_the_turbo_sigmas(steps):
    settings = TeacherSettings(steps, 2.0, 3.0)
    grid = settings.sigmas()
    idx = settings.student_indices()
    assert idx == tuple(range(0, steps + 1, steps // 8))
    assert torch.allclose(grid[list(idx)], torch.tensor(STUDENT_GRID), atol=1e-7, rtol=0)
    assert settings.student_sigmas == STUDENT_SIGMAS == TURBO_SIGMAS
    assert [round(s, 4) for s in STUDENT_SIGMAS] == [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]
    assert settings.passes == 2 * steps and TeacherSettings(steps, 1.0).passes == steps


@pytest.mark.parametrize(("steps", "shift"), [(30, 3.0), (20, 3.0), (33, 3.0), (32, 2.0)])
def test_teacher_grid_without_the_turbo_sigmas_is_refused(steps, shift):
    with pytest.raises(DistillError) as e:
        TeacherSettings(steps, 2.0, shift)
    message = str(e.value)
    assert f"teacher steps = {steps}" in message and "student sigmas" in message
    assert "0.9545" in message or "0.8333" in message  # names the missing sigmas


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 32.0}, {"cfg": float("nan")}, {"shift": 0.0}])
def test_bad_teacher_settings_are_refused(bad):
    with pytest.raises(DistillError, match=next(iter(bad))):
        TeacherSettings(**bad)


# ---- trajectories -------------------------------------------------------------------------------------


def test_teacher_trajectory_is_the_de_turbo_sampler_with_the_distill_lora_off(embeds, negative, tmp_path):
    model, _ = student_model()
    randomize_distill(model)
    job = TrajectoryJob(embeds[0], 7, SIZE, SIZE)
    (path,) = ensure_trajectories(model, [job], negative, tmp_path, "tiny", TEACHER)
    assert path == trajectory_path(tmp_path, trajectory_key(job, negative, TEACHER, "tiny"))
    assert path.parent == tmp_path / "trajectories"
    traj = load_trajectories([path])[0]
    assert traj.shape == (9, 16, 8, 8) and traj.dtype == torch.float32
    assert torch.equal(traj[0], initial_noise(7, SIZE, SIZE))
    deturbo = SamplerSettings("teacher", TEACHER.steps, TEACHER.cfg, TEACHER.shift)
    with adapters_disabled(model, ["zit"]):
        teacher_end = sample_latents(model, [embeds[0]], negative, [7], SIZE, SIZE, deturbo)[0]
    with_distill = sample_latents(model, [embeds[0]], negative, [7], SIZE, SIZE, deturbo)[0]
    assert torch.allclose(traj[-1], teacher_end, atol=1e-5, rtol=0)
    assert (traj[-1] - with_distill).norm() > 100 * (traj[-1] - teacher_end).norm()
    # x at the second student sigma (0.9545) is 4 teacher steps from the noise.
    x, sig = traj[0][None], TEACHER.sigmas().tolist()
    with torch.no_grad(), adapters_disabled(model, ["zit"]):
        for s, s_next in zip(sig[:4], sig[1:5], strict=True):
            v = predict_velocity(model, x, torch.tensor([s]), [embeds[0]])
            v_neg = predict_velocity(model, x, torch.tensor([s]), [negative])
            x = x + (s_next - s) * (v_neg + 2.0 * (v - v_neg))
    assert torch.allclose(traj[1], x[0], atol=1e-6, rtol=0)


def _count_passes(model: torch.nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_trajectory_cache_reuses_resumes_and_rebuilds_bad_entries(embeds, negative, tmp_path, caplog):
    model, _ = student_model()
    calls = _count_passes(model)
    jobs = [TrajectoryJob(embeds[0], 0, SIZE, SIZE), TrajectoryJob(embeds[1], 0, SIZE, SIZE),
            TrajectoryJob(embeds[0], 1, SIZE, SIZE), TrajectoryJob(embeds[0], 0, SIZE, SIZE)]  # 4th: a repeat
    # An interrupted build: only the first job was made.
    ensure_trajectories(model, jobs[:1], negative, tmp_path, "tiny", TEACHER)
    assert calls[0] == TEACHER.passes == 64
    seen = []
    paths = ensure_trajectories(model, jobs, negative, tmp_path, "tiny", TEACHER,
                                progress=lambda d, t: seen.append((d, t)))
    assert calls[0] == 3 * 64 and seen == [(1, 2), (2, 2)] and paths[0] == paths[3]
    stamps = [p.stat().st_mtime_ns for p in paths]
    original = load_trajectories(paths[:3])

    assert ensure_trajectories(model, jobs, negative, tmp_path, "tiny", TEACHER) == paths
    assert calls[0] == 3 * 64 and [p.stat().st_mtime_ns for p in paths] == stamps

    paths[0].write_bytes(paths[0].read_bytes()[:200])  # truncated
    bad = original[1].clone()
    bad[3, 0, 0, 0] = float("nan")
    save_file({"latents": bad}, paths[1])
    save_file({"latents": original[2][:, :, :4].contiguous()}, paths[2])  # wrong shape
    with caplog.at_level(logging.WARNING, logger="trainer.distill_cache"):
        assert ensure_trajectories(model, jobs, negative, tmp_path, "tiny", TEACHER, batch_size=3) == paths
    assert calls[0] == 4 * 64  # the three were rebuilt in one batch of 3
    assert torch.allclose(load_trajectories(paths[:3]), original, atol=1e-5, rtol=0)
    log = caplog.text
    assert paths[0].name in log and "unreadable" in log
    assert paths[1].name in log and "non-finite" in log
    assert paths[2].name in log and "shape (9, 16, 4, 8)" in log

    other = {trajectory_key(jobs[0], negative, s, m) for s, m in
             [(TEACHER, "tiny"), (TeacherSettings(48), "tiny"), (TeacherSettings(32, 3.0), "tiny"),
              (TEACHER, "tiny+sft@0.5")]}
    other |= {trajectory_key(TrajectoryJob(embeds[0], 0, SIZE, 2 * SIZE), negative, TEACHER, "tiny"),
              trajectory_key(jobs[0], embeds[1], TEACHER, "tiny")}
    assert len(other) == 6
    with pytest.raises(DistillError, match="model_id"):
        ensure_trajectories(model, jobs, negative, tmp_path, "", TEACHER)
    with pytest.raises(DistillError, match="72x64"):
        ensure_trajectories(model, [TrajectoryJob(embeds[0], 0, 72, 64)], negative, tmp_path, "tiny")


def test_lora_fingerprint_tracks_values():
    a, b = random_lora(2, TINY_SPEC, seed=1), random_lora(2, TINY_SPEC, seed=1)
    assert lora_fingerprint(a) == lora_fingerprint(b)
    next(iter(b.modules.values())).b[0, 0] += 1e-3
    assert lora_fingerprint(a) != lora_fingerprint(b)


# ---- the objective ------------------------------------------------------------------------------------


def _relative_gap(model, embeds, negative, seeds, end) -> float:
    x8 = sample_latents(model, embeds, negative, seeds, SIZE, SIZE, TURBO)
    return float((x8 - end).norm() / end.norm())


def _sft_step_seconds(model, embeds, x0, opt, n: int = 20) -> float:
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(n):
        noise = torch.randn(x0.shape, generator=gen)
        sig = torch.rand(x0.shape[0], generator=gen)
        pred = predict_velocity(model, add_noise(x0, noise, sig), sig, embeds)
        flow_loss(pred, velocity_target(x0, noise)).backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / n


def test_distill_lora_brings_turbo_output_to_the_teacher(embeds, negative, tmp_path, capsys):
    model, _ = student_model()
    jobs = [TrajectoryJob(embeds[p], seed, SIZE, SIZE) for p in range(2) for seed in range(2)]
    start = time.perf_counter()
    paths = ensure_trajectories(model, jobs, negative, tmp_path, "tiny", TEACHER, batch_size=4)
    traj = load_trajectories(paths)
    teacher_s = (time.perf_counter() - start) / len(jobs)
    held_out = load_trajectories(ensure_trajectories(model, [TrajectoryJob(embeds[0], 9, SIZE, SIZE)],
                                                     negative, tmp_path, "tiny", TEACHER))
    prompts, seeds = [j.embed for j in jobs], [j.seed for j in jobs]
    with adapters_disabled(model, ["zit", "adapter"]):
        base_gap = _relative_gap(model, prompts, negative, seeds, traj[:, -1])
    before = _relative_gap(model, prompts, negative, seeds, traj[:, -1])
    held_before = _relative_gap(model, [embeds[0]], negative, [9], held_out[:, -1])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    gen, losses = torch.Generator().manual_seed(0), []
    start = time.perf_counter()
    for _ in range(150):
        loss = distill_terms(model, traj, prompts, gen).total
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    distill_s = (time.perf_counter() - start) / 150
    after = _relative_gap(model, prompts, negative, seeds, traj[:, -1])
    held_after = _relative_gap(model, [embeds[0]], negative, [9], held_out[:, -1])
    sft_s = _sft_step_seconds(model, prompts, traj[:, -1], opt)

    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    with capsys.disabled():
        print(f"\n[distill] ||x8 - x_teacher|| / ||x_teacher||: base alone {base_gap:.4f}, base+SFT before "
              f"{before:.4f}, after 150 steps {after:.4f} (x{before / after:.2f} closer); held-out seed "
              f"{held_before:.4f} -> {held_after:.4f}; loss {first:.5f} -> {last:.5f}")
        print(f"[distill] tiny model, batch 4 at {SIZE}px: distill step {distill_s * 1e3:.1f} ms, "
              f"sft flow step {sft_s * 1e3:.1f} ms; teacher {teacher_s:.2f} s per trajectory "
              f"({TEACHER.passes} passes)")
    assert base_gap > 2 * before  # the SFT LoRA is visible and the teacher carries it
    assert last < first / 2
    assert after < before / 2


def test_velocity_target_is_the_teacher_step():
    traj = torch.randn(3, 9, 16, 4, 4)
    idx = torch.tensor([0, 4, 7])
    v = teacher_velocity(traj, idx)
    grid = torch.tensor(STUDENT_GRID)
    for b, i in enumerate(idx.tolist()):
        assert torch.allclose(traj[b, i] + (grid[i + 1] - grid[i]) * v[b], traj[b, i + 1], atol=1e-5)


def test_distill_loss_refuses_bad_input(embeds):
    model, _ = student_model()
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(DistillError, match=r"\(batch, 9"):
        distill_terms(model, torch.zeros(2, 8, 16, 8, 8), embeds, gen)
    with pytest.raises(DistillError, match="1 text embeddings for 2"):
        distill_terms(model, torch.zeros(2, 9, 16, 8, 8), embeds[:1], gen)
    with pytest.raises(DistillError, match="rollout = 1"):
        distill_terms(model, torch.zeros(2, 9, 16, 8, 8), embeds, gen, rollout=1, rollout_weight=1.0)


def _rollout_reference(model, traj, embeds, idx, detach: bool) -> torch.Tensor:
    """Two student Euler steps from x_i by hand, the implied x0 against the teacher's (detach: no BPTT)."""
    grid = torch.tensor(STUDENT_GRID)
    losses = []
    for b, i in enumerate(idx.tolist()):
        x = x_start = traj[b, i][None]
        for k in (i, i + 1):
            x_in = x.detach() if detach and k > i else x
            v = predict_velocity(model, x_in, grid[k][None], [embeds[b]])
            x = x + (grid[k + 1] - grid[k]) * v
        span = grid[i + 2] - grid[i]
        x0_student = x_start - grid[i] * (x - x_start) / span
        x0_teacher = x_start - grid[i] * (traj[b, i + 2][None] - x_start) / span
        losses.append(mse_per_sample(x0_student, x0_teacher))
    return torch.cat(losses).mean()


def _grads(model, loss) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def test_rollout_term_trains_the_distill_lora_through_every_step(embeds, negative, tmp_path):
    model, _ = student_model()
    randomize_distill(model)
    jobs = [TrajectoryJob(embeds[0], 0, SIZE, SIZE), TrajectoryJob(embeds[1], 1, SIZE, SIZE)]
    paths = ensure_trajectories(model, jobs, negative, tmp_path, "tiny", TeacherSettings(16))
    traj = load_trajectories(paths)
    seed = next(s for s in range(100)
                if torch.randint(8, (2,), generator=torch.Generator().manual_seed(s)).max() < 6)
    terms = distill_terms(model, traj, embeds, torch.Generator().manual_seed(seed), rollout=2,
                          rollout_weight=1.0, velocity_weight=0.0)
    assert terms.total is not terms.velocity and terms.rollout is not None
    grads = _grads(model, terms.total)
    assert all("lora_" in n and ".zit" in n for n in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())  # every distill factor, A and B
    reference = _grads(model, _rollout_reference(model, traj, embeds, terms.indices, detach=False))
    truncated = _grads(model, _rollout_reference(model, traj, embeds, terms.indices, detach=True))
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref = torch.cat([g.flatten() for g in reference.values()])
    cut = torch.cat([g.flatten() for g in truncated.values()])
    assert torch.allclose(flat, ref, rtol=1e-4, atol=1e-9)
    assert (flat - cut).norm() > 0.01 * flat.norm()  # the gradient through step 1 into step 2 matters
    # In x0 space one step from x_i (s_7 = 0.3 reaches s = 0 after one step) is s_i^2 times the velocity MSE.
    last = next(s for s in range(2000)
                if torch.randint(8, (2,), generator=torch.Generator().manual_seed(s)).min() == 7)
    one = distill_terms(model, traj, embeds, torch.Generator().manual_seed(last), rollout=3,
                        rollout_weight=1.0)
    assert one.rollout is not None and float(one.velocity.detach()) > 0
    assert torch.allclose(one.rollout, STUDENT_SIGMAS[7] ** 2 * one.velocity, rtol=1e-4)


# ---- outputs ------------------------------------------------------------------------------------------


def test_merged_lora_is_sft_plus_distill_exactly(embeds, tmp_path):
    strength = 0.7
    model, sft = student_model(sft_rank=4, distill_rank=8, sft_strength=strength)
    randomize_distill(model)
    distill, merged = distill_outputs(model, sft, strength, metadata={"zit.step": "5"})
    assert merged.ranks() == {12} and distill.ranks() == {8}
    assert merged.metadata["zit.distill"] == "merged" and distill.metadata["zit.step"] == "5"
    for key, m in merged.modules.items():
        s, d = sft.modules[key], distill.modules[key]
        assert torch.equal(m.a, torch.cat([s.a, d.a]))
        assert torch.equal(m.b, torch.cat([s.b * strength, d.b], 1))
        assert torch.allclose(m.delta(), strength * s.delta() + d.delta(), rtol=0, atol=1e-7)

    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = torch.tensor([0.6])
    with torch.no_grad():
        stacked = predict_velocity(model, x, sig, embeds[:1])
    for dialect in ("comfy", "aitoolkit"):
        back = read_lora(write_lora(merged, tmp_path / f"merged_{dialect}.safetensors", dialect, "fp32"))
        assert back.ranks() == {12}
        for key, m in merged.modules.items():
            assert torch.allclose(back.modules[key].delta(), m.delta(), rtol=0, atol=1e-7)
        single = tiny_transformer(0)
        load_lora_into_peft(single, back, "merged", trainable=False)
        with torch.no_grad():
            assert torch.allclose(predict_velocity(single, x, sig, embeds[:1]), stacked, atol=1e-5, rtol=0)
    alone = read_lora(write_lora(distill, tmp_path / "distill.safetensors", "comfy", "fp32"))
    assert alone.ranks() == {8} and alone.metadata["zit.distill"] == "distill"

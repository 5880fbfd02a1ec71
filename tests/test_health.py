"""The turbo-health meter on the turbo fixture (a tiny teacher and its reflow distillation, built on the CPU).

A plain LoRA trained on the fixture (sft) must raise health past the warning threshold; a LoRA that is not
trained must leave it at 1.0; the same LoRA trained over the fixture's de-distilling adapter (adapter mode)
must keep it lower than sft at the same steps. The curves are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import pytest
import torch

from trainer.config import config_from_dict
from trainer.demo import make_dataset
from trainer.errors import ZitError
from trainer.health import (
    TURBO_WARNING,
    WARNING_MESSAGE,
    HealthError,
    TurboHealth,
    disagreement,
    turbo_x0_predictions,
)
from trainer.loop import ADAPTER, Trainer
from trainer.lora.writing import write_lora
from trainer.model import adapters_disabled, attach_frozen_adapter, inject_lora, predict_velocity
from trainer.objective import add_noise, flow_loss, inference_sigmas, sample_shifted, velocity_target
from trainer.sampling import TURBO, sample_latents
from trainer.turbo_fixture import TurboFixture, build_turbo_fixture, fixture_report, open_fixture_models

SIZE = 64
SEEDS = [0, 1, 2, 3]  # distilled seeds of the seed-0 fixture, two per prompt
STEPS, EVERY, LR, RANK = 40, 10, 2e-3, 8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx(one_thread) -> TurboFixture:
    """The seed-0 turbo fixture, shared by the module (tests must not change its models)."""
    return build_turbo_fixture(0)


def _model(fx: TurboFixture, adapter: bool) -> torch.nn.Module:
    """A copy of the turbo model with a fresh trainable rank-8 LoRA "zit" (over the adapter if asked)."""
    model = fx.fresh_model()
    if adapter:
        attach_frozen_adapter(model, fx.training_adapter(), name="adapter")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        inject_lora(model, RANK, RANK, "aitoolkit", adapter_name="zit")
    return model


def _health(fx: TurboFixture, model: torch.nn.Module, adapter: bool) -> TurboHealth:
    return TurboHealth(model, fx.prompt_embeds(SEEDS), SEEDS, SIZE, SIZE,
                       disable=["adapter"] if adapter else [])


def train_curve(fx: TurboFixture, mode: str) -> list[float]:
    """Health after every EVERY steps of flow-matching LoRA training on 8 world latents of prompt 0."""
    adapter, lr = mode == "adapter", 0.0 if mode == "lr0" else LR
    model = _model(fx, adapter)
    health = _health(fx, model, adapter)
    health.reference()
    gen = torch.Generator().manual_seed(5)
    data = fx.world(8, 0, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr)
    model.train()
    curve = []
    for step in range(1, STEPS + 1):
        x0 = data[torch.randint(len(data), (4,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        sigmas = sample_shifted(4, generator=gen)
        pred = predict_velocity(model, add_noise(x0, noise, sigmas), sigmas, [fx.embeds[0]] * 4)
        flow_loss(pred, velocity_target(x0, noise)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % EVERY == 0:
            curve.append(health.measure())
    return curve


@pytest.fixture(scope="module")
def curves(fx) -> dict[str, list[float]]:
    """Health curves of the three runs: sft, adapter mode, and sft at lr 0."""
    out = {mode: train_curve(fx, mode) for mode in ("sft", "adapter", "lr0")}
    steps = list(range(EVERY, STEPS + 1, EVERY))
    for mode, curve in out.items():
        print(f"turbo health {mode:8s} at steps {steps}: {[round(h, 2) for h in curve]}")
    return out


# ---- the fixture ---------------------------------------------------------------------------------------


def test_fixture_is_a_miniature_turbo(fx):
    assert torch.allclose(inference_sigmas(32)[::4], inference_sigmas(8))  # teacher grid has the turbo sigmas
    report = fixture_report(fx)
    print(f"turbo fixture built in {sum(fx.timings.values()):.1f} s ({fx.timings}); {report}")
    # 8-step cfg-1 output of the turbo model is much nearer the 32-step cfg-2 teacher than the teacher's own
    assert report.turbo_gap < report.teacher_gap / 2
    # and its x0 predictions agree along the trajectory far better than the teacher's (a straight flow)
    assert report.turbo_disagreement < report.teacher_disagreement / 4
    assert report.teacher_gap > 0.1 and report.turbo_gap < 0.1  # there was a gap to close, and it closed


def test_training_adapter_undoes_the_distillation(fx):
    model = fx.fresh_model()
    attach_frozen_adapter(model, fx.training_adapter(), name="adapter")
    x = torch.randn(2, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    sigmas, embeds = torch.tensor([0.9, 0.5]), fx.embeds
    with torch.no_grad():
        teacher = predict_velocity(fx.teacher, x, sigmas, embeds)
        with_adapter = predict_velocity(model, x, sigmas, embeds)
        with adapters_disabled(model):
            turbo = predict_velocity(model, x, sigmas, embeds)
    assert (with_adapter - teacher).abs().max() < 1e-4 * teacher.abs().max()
    assert (turbo - teacher).abs().max() > 1e-2 * teacher.abs().max()


def test_fixture_build_is_deterministic():
    a = build_turbo_fixture(0, n_seeds=2, teacher_steps=2, distill_steps=2)
    b = build_turbo_fixture(0, n_seeds=2, teacher_steps=2, distill_steps=2)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    q = "layers.0.attention.to_q.weight"
    assert not torch.equal(sa[q], a.teacher.state_dict()[q])  # the distillation did move the weights


# ---- the meter -----------------------------------------------------------------------------------------


def test_disagreement_formula():
    last = torch.ones(1, 2, 2, 2)
    x0s = [torch.zeros_like(last), 3 * last, 2 * last, last]  # step 0 ignored; steps 1, 2 vs the last
    assert disagreement(x0s).tolist() == [pytest.approx((4.0 + 1.0) / 2)]
    assert disagreement([last] * 8).tolist() == [0.0]
    with pytest.raises(HealthError, match="2 sampler steps"):
        disagreement([last, last])


def test_meter_follows_the_turbo_sampler(fx):
    embeds = fx.prompt_embeds(SEEDS)
    x0s = turbo_x0_predictions(fx.model, embeds, SEEDS, SIZE, SIZE)
    sample = sample_latents(fx.model, embeds, fx.empty_embed, SEEDS, SIZE, SIZE, TURBO)
    assert len(x0s) == 8
    assert torch.allclose(x0s[-1], sample, atol=1e-5)  # the last x0 prediction is the 8-step sample


def test_health_is_flat_without_training(curves):
    assert curves["lr0"] == pytest.approx([1.0] * (STEPS // EVERY), abs=1e-6)


def test_sft_breaks_turbo(fx, curves):
    sft = curves["sft"]
    assert sft[-1] > TURBO_WARNING and sft[-1] == max(sft) and sft[0] < TURBO_WARNING
    health = _health(fx, fx.fresh_model(), False)
    message = health.warning(sft[-1])
    assert message is not None and message.endswith(WARNING_MESSAGE) and f"{sft[-1]:.2f}" in message
    assert health.warning(1.0) is None and health.warning(float("nan")) is not None


def test_adapter_mode_keeps_turbo_longer(curves):
    # Over 2 fixture seeds x 4 data seeds at step 40: sft 2.5-3.8, adapter 1.26-1.68 (see trainer/health.py).
    sft, adapter = curves["sft"], curves["adapter"]
    assert all(a < s for a, s in zip(adapter[2:], sft[2:], strict=True))  # from step 30 on
    assert max(adapter) < TURBO_WARNING < sft[-1]
    assert sft[-1] > 1.4 * adapter[-1]
    assert max(adapter) > 1.1  # the adapter-mode LoRA did learn something


def test_measure_restores_the_model(fx):
    model = _model(fx, adapter=True)
    health = _health(fx, model, adapter=True)
    x = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.7])
    model.train()
    with torch.no_grad():
        before = predict_velocity(model, x, sigma, fx.embeds[:1])
    assert health.measure() == pytest.approx(1.0, abs=1e-6)
    assert model.training
    with torch.no_grad():
        assert torch.equal(predict_velocity(model, x, sigma, fx.embeds[:1]), before)  # adapter back on
        for name, p in model.named_parameters():
            if "lora_B" in name and "zit" in name:
                p.add_(0.05)
    reference = health.reference()
    assert health.measure() != pytest.approx(1.0, abs=1e-3)
    assert health.reference() == reference  # computed once: later training does not move it


def test_bad_requests_are_refused(fx):
    model, embeds = fx.fresh_model(), fx.prompt_embeds(SEEDS)
    with pytest.raises(HealthError, match="3 prompt embeddings for 4 seeds"):
        TurboHealth(model, embeds[:3], SEEDS, SIZE, SIZE)
    with pytest.raises(HealthError, match="width 60"):
        TurboHealth(model, embeds, SEEDS, 60, SIZE)
    with pytest.raises(HealthError, match="no seeds"):
        TurboHealth(model, [], [], SIZE, SIZE)
    with pytest.raises(HealthError, match="threshold 1"):
        TurboHealth(model, embeds, SEEDS, SIZE, SIZE, threshold=1.0)
    with pytest.raises(HealthError, match="2 sampler steps"):
        TurboHealth(model, embeds, SEEDS, SIZE, SIZE, steps=2)
    with pytest.raises(ZitError, match="'adapter'"):
        TurboHealth(model, embeds, SEEDS, SIZE, SIZE, disable=["adapter"])  # the model has no such adapter


def test_meter_on_a_real_adapter_mode_trainer(fx, tmp_path):
    """The wiring the loop will use: the real Trainer on the fixture, the adapter read from a file."""
    adapter = tmp_path / "adapter.safetensors"
    write_lora(fx.training_adapter(), adapter)
    cfg = config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(make_dataset(tmp_path / "data", n=3, size=SIZE)), "resolutions": [SIZE],
                 "min_side": 32, "caption_dropout": 0.0, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": RANK, "alpha": float(RANK)},
        "turbo": {"mode": "adapter", "adapter": str(adapter)},
        "optim": {"lr": LR, "steps": 100, "seed": 0},
        "save": {"output_dir": str(tmp_path / "run"), "name": "run", "every": 0},
        "preview": {"every": 0, "prompts": list(fx.prompts), "width": SIZE, "height": SIZE},
    }, source="test")
    trainer = Trainer(cfg, models=open_fixture_models(fx))
    embeds = [trainer.preview_embeds[s % 2] for s in SEEDS]
    assert all(torch.equal(a, b) for a, b in zip(embeds, fx.prompt_embeds(SEEDS), strict=True))
    health = TurboHealth(trainer.model, embeds, SEEDS, SIZE, SIZE, disable=[ADAPTER])
    assert health.measure() == 1.0  # B = 0 and the adapter removed: exactly the base
    # with the adapter left on, the model is the teacher: its x0 drifts ~12x as much
    assert TurboHealth(trainer.model, embeds, SEEDS, SIZE, SIZE).measure() > 4
    for _ in range(20):
        trainer.train_step()
    assert health.measure() > 1.1
    assert trainer.model.training

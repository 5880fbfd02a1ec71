"""turbo.mode = "distill" through the real Trainer on the tiny model: the teacher (base + SFT LoRA) samples
every caption x seed once into the trajectory cache, the distill LoRA trains on them, and both the distill
LoRA and the exact SFT + distill merge are saved; a resumed run is bitwise the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_loop import SIZE, assert_same_tensors, make_config, tensors

from trainer.config import ConfigError
from trainer.demo import make_adapter, make_dataset
from trainer.loop import Trainer
from trainer.lora.formats import read_lora

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distill")
    return make_dataset(root / "images", n=2, size=SIZE), make_adapter(root / "sft.safetensors", seed=3)


def distill_config(out: Path, setup: tuple[Path, Path], **extra) -> object:
    images, sft = setup
    turbo = {"mode": "distill", "adapter": str(sft), "teacher_steps": 16, "teacher_seeds": SEEDS, **extra}
    return make_config(out, images, turbo=turbo, data={"batch_size": 2})


def test_distill_mode_saves_the_distill_lora_and_the_exact_merge(tmp_path, setup):
    cfg = distill_config(tmp_path, setup)
    trainer = Trainer(cfg)
    trajectories = sorted((cfg.cache_path / "trajectories").glob("*.safetensors"))
    assert len(trajectories) == 2 * SEEDS  # 2 captions x 2 seeds, one size
    before = {p: p.stat().st_mtime_ns for p in trajectories}
    result = trainer.run()
    assert all(torch.isfinite(torch.tensor(result.losses))) and len(result.losses) == cfg.optim.steps
    distill = read_lora(result.lora_path)
    merged = read_lora(tmp_path / "run" / "run_merged.safetensors")
    sft = read_lora(setup[1])
    for key, module in merged.modules.items():
        parts = [m for m in (sft.modules.get(key), distill.modules.get(key)) if m is not None]
        assert module.rank == sum(m.rank for m in parts)
        expected = sum(m.b @ m.a for m in parts)
        assert torch.allclose(module.b @ module.a, expected, atol=1e-6)
    assert any(float(m.b.abs().max()) > 0 for m in distill.modules.values())  # the distill LoRA learned
    Trainer(distill_config(tmp_path / "again", setup))  # the same teacher: the cache is reused, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in trajectories} == before


def test_distill_resume_is_bitwise_identical(tmp_path, setup):
    straight = Trainer(distill_config(tmp_path / "a", setup)).run()
    cfg = distill_config(tmp_path / "b", setup)
    turbo = dict(cfg.turbo.__dict__)
    Trainer(make_config(tmp_path / "b", setup[0], turbo=turbo, data={"batch_size": 2}, optim={"steps": 3},
                        save={"every": 3})).run()
    resumed = Trainer(cfg, resume=True).run()
    assert_same_tensors(tensors(straight.lora_path), tensors(resumed.lora_path))


@pytest.mark.parametrize("turbo, words", [
    ({"mode": "distill"}, "turbo.adapter is required"),
    ({"mode": "distill", "adapter": "x.safetensors", "teacher_steps": 30}, "turbo.teacher_steps = 30"),
    ({"mode": "distill", "adapter": "x.safetensors", "rollout": 2}, "turbo.rollout_weight"),
    ({"mode": "sft", "teacher_cfg": 3.0}, "only used when turbo.mode = \"distill\""),
])
def test_bad_distill_settings_are_refused_naming_the_field(tmp_path, setup, turbo, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        make_config(tmp_path, setup[0], turbo=turbo)

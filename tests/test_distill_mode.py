"""turbo.mode = "distill" through the real Trainer on the tiny model: the teacher (base + SFT LoRA) samples
every caption x seed once into the trajectory cache, the distill LoRA trains on them, and both the distill
LoRA and the exact SFT + distill merge are saved; a resumed run is bitwise the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _loop_helpers import SIZE, Events, assert_same_tensors, make_config, tensors

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


def test_distill_from_a_prompt_list_needs_no_images(tmp_path, setup):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# teacher prompts\na red circle\n\na blue square\n", encoding="utf-8")
    cfg = distill_config(tmp_path, setup, teacher_prompts=str(prompts))
    cfg = make_config(tmp_path, "", turbo=dict(cfg.turbo.__dict__), data={"batch_size": 2})
    result = Trainer(cfg).run()
    assert len(list((cfg.cache_path / "trajectories").glob("*.safetensors"))) == 2 * SEEDS
    assert not list(cfg.cache_path.glob("latents/*"))  # nothing was encoded from images
    assert len(result.losses) == cfg.optim.steps and (tmp_path / "run" / "run_merged.safetensors").is_file()


def test_distill_into_the_sft_lora_keeps_training_it(tmp_path, setup):
    events = Events()
    result = Trainer(distill_config(tmp_path, setup, distill_into="sft"), events).run()
    trained, sft = read_lora(result.lora_path), read_lora(setup[1])
    assert trained.modules.keys() == sft.modules.keys() and trained.ranks() == sft.ranks()
    moved = max(float((trained.modules[k].delta() - m.delta()).abs().max()) for k, m in sft.modules.items())
    assert moved > 1e-4  # it learned, starting from the SFT LoRA (not from zero)
    assert not (tmp_path / "run" / "run_merged.safetensors").exists()  # it is already the whole LoRA


def test_distill_health_is_the_distance_to_the_teacher_relative_to_the_sft_lora(tmp_path, setup):
    events = Events()
    cfg = make_config(tmp_path, setup[0], turbo=dict(distill_config(tmp_path, setup).turbo.__dict__),
                      data={"batch_size": 2}, preview={"every": 0, "health_every": 3})
    trainer = Trainer(cfg, events)
    assert trainer.measure_health() == pytest.approx(1.0, abs=1e-6)  # the distill LoRA starts at zero
    trainer.run()
    health = events.of("health")
    assert [h["step"] for h in health] == [0, 3, 6] and health[0]["threshold"] == 1.0
    assert health[-1]["health"] != pytest.approx(1.0, abs=1e-4)  # the meter sees the distill LoRA
    meta = read_lora(tmp_path / "run" / "run.safetensors").metadata
    assert float(meta["zit.turbo_health"]) == pytest.approx(health[-1]["health"], rel=1e-3)


@pytest.mark.parametrize("what, words", [
    ("flux", "looks like a LoRA for Flux"),
    ("wide", "dW would be"),
])
def test_an_sft_lora_for_another_model_is_refused_before_loading(tmp_path, setup, what, words):
    from safetensors.torch import save_file

    path = tmp_path / f"{what}.safetensors"
    names = (("transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight")
             if what == "flux" else
             ("diffusion_model.layers.0.attention.to_q.lora_A.weight",
              "diffusion_model.layers.0.attention.to_q.lora_B.weight"))
    save_file({names[0]: torch.zeros(4, 3072), names[1]: torch.zeros(3072, 4)}, str(path))
    events = Events()
    with pytest.raises(Exception, match=words) as info:
        Trainer(distill_config(tmp_path, (setup[0], path)), events)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not [d for d in events.of("log") if "loading the model" in d.get("message", "")]


@pytest.mark.parametrize("content, words", [
    (b"", "no prompts"),
    (b"# only a comment\n\n", "no prompts"),
    (b"\xff\xfe bad", "not UTF-8"),
    (None, "no such file"),
])
def test_a_bad_prompt_list_is_refused_naming_the_file(tmp_path, setup, content, words):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    events = Events()
    with pytest.raises(Exception, match=words) as info:
        Trainer(distill_config(tmp_path, setup, teacher_prompts=str(path)), events)
    assert "turbo.teacher_prompts" in str(info.value)
    assert not [d for d in events.of("log") if "loading the model" in d.get("message", "")]

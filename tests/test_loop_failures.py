"""The training loop stopping and failing (tiny model, CPU, fp32): a stop through the job runner leaves a
resumable checkpoint, a NaN loss fails the job and keeps the last good one, and bad input (dataset, adapter,
transformer file, config) is refused with the name of what is wrong before the model loads or a step runs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from _loop_helpers import SIZE, assert_same_tensors, make_config, tensors
from _loop_helpers import cache as cache  # a fixture (module-scoped here)
from _loop_helpers import images as images  # a fixture (module-scoped here)

from trainer import run_setup, step_loss
from trainer.checkpoint import find_latest_checkpoint
from trainer.config import ConfigError
from trainer.demo import make_dataset
from trainer.errors import ZitError
from trainer.job import FAILED, STOPPED, JobRunner
from trainer.loop import Trainer, train
from trainer.lora.formats import read_lora

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the job runner: stop and failure ------------------------------------------------------------------


def test_stop_through_the_job_runner_saves_a_resumable_checkpoint(tmp_path, images, cache):
    cfg = make_config(tmp_path, images, cache, optim={"steps": 500}, save={"every": 2})
    runner = JobRunner()
    progress = []

    def listener(event):
        if event.kind == "progress":
            progress.append(event.data["step"])
            if event.data["step"] == 3:
                runner.get(event.job_id).stop()

    runner.subscribe(listener)
    job = runner.start("train", lambda ctx: train(cfg, ctx))
    assert job.wait(120)
    assert job.status == STOPPED and job.error is None, job.error
    assert job.result.stopped and job.result.step == 3 and progress == [1, 2, 3]
    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == 3 and ckpt.lora is not None and ckpt.state is not None
    assert read_lora(ckpt.lora).metadata["zit.step"] == "3"

    resumed = make_config(tmp_path, images, cache, optim={"steps": 5}, save={"every": 2})
    result = train(resumed, resume=True)
    assert result.step == 5 and len(result.losses) == 2


def test_nan_loss_fails_the_job_and_keeps_the_last_checkpoint(tmp_path, images, cache, monkeypatch):
    calls = itertools.count(1)
    real_loss = step_loss.flow_loss

    def nan_at_step_5(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if next(calls) == 5 else loss

    monkeypatch.setattr(step_loss, "flow_loss", nan_at_step_5)
    cfg = make_config(tmp_path, images, cache, optim={"steps": 8}, save={"every": 2})
    job = JobRunner().start("train", lambda ctx: train(cfg, ctx))
    assert job.wait(120)
    assert job.status == FAILED
    assert "nan" in job.error.lower() and "step 5" in job.error, job.error

    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == 4
    lora = read_lora(ckpt.lora)
    assert all(torch.isfinite(m.b).all() for m in lora.modules.values())
    assert_same_tensors(tensors(cfg.run_dir / "run.safetensors"), tensors(ckpt.lora))
    monkeypatch.undo()
    assert train(cfg, resume=True).step == 8


# ---- bad input is refused before training ---------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a run loads the model or takes a step."""

    def refuse(*args, **kwargs):
        raise AssertionError("got past the input checks")

    monkeypatch.setattr(run_setup, "open_models", refuse)
    monkeypatch.setattr(Trainer, "train_step", refuse)


def _corrupt_folder(tmp_path: Path) -> Path:
    folder = make_dataset(tmp_path / "corrupt", n=1, size=SIZE)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "broken.txt").write_text("a broken image")
    return folder


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt"])
def test_bad_dataset_is_a_zit_error_naming_it_before_the_model_loads(tmp_path, no_training, case):
    if case == "empty":
        folder, words = tmp_path / "empty", ["empty", "no usable images"]
        folder.mkdir()
    elif case == "missing":
        folder, words = tmp_path / "nowhere", ["nowhere", "does not exist"]
    else:
        folder, words = _corrupt_folder(tmp_path), ["broken.png"]
    cfg = make_config(tmp_path, folder, data={"bad_image": "error"})
    with pytest.raises(ZitError) as info:
        train(cfg)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_missing_adapter_file_is_named(tmp_path, images, cache):
    cfg = make_config(tmp_path, images, cache,
                      turbo={"mode": "adapter", "adapter": str(tmp_path / "no_adapter.safetensors")})
    with pytest.raises(ZitError, match="no_adapter.safetensors"):
        train(cfg)
    assert not list(cfg.run_dir.glob("*.safetensors"))


def test_a_missing_transformer_file_is_a_zit_error_naming_it(tmp_path, images):
    cfg = make_config(tmp_path, images, model={"transformer": str(tmp_path / "zit_missing.safetensors"),
                                               "text_encoder": str(tmp_path / "te.safetensors"),
                                               "vae": str(tmp_path / "ae.safetensors")})
    with pytest.raises(ZitError, match="zit_missing.safetensors"):
        train(cfg)


@pytest.mark.parametrize("section, values, field", [
    ("optim", {"lr": 0}, "optim.lr"),
    ("data", {"resolutions": [100]}, "data.resolutions"),
    ("turbo", {"mode": "adapter"}, "turbo.adapter"),
    ("preview", {"every": 5}, "preview.prompts"),
    ("optim", {"learning_rate": 1e-3}, "optim.learning_rate"),
])
def test_bad_config_is_a_config_error_naming_the_field(tmp_path, images, section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config(tmp_path, images, **{section: values})

"""Bad input to training: the config, the run folder and the dataset are refused before anything is written.

Each case runs `train` through the real command line in this process (`trainer.cli.main`) with the tiny
model; the refusal comes before the model loads, and the lines a run prints while checking (memory plan,
model family) are held back, so the error line is all there is. An earlier run is never overwritten, and
the resolution bound the config checks is the dataset's bucket step.
"""

from __future__ import annotations

import inspect
import json

import pytest
from _bad_inputs_world import (
    assert_refused,
    fill,
    run_cli,
    snapshot,
    write_config,
)
from _bad_inputs_world import world as world  # a fixture (module-scoped here)

from trainer.config import ConfigError, check_field
from trainer.config_fields import FIELDS
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora
from trainer.tiny import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


TRAIN_CASES = {
    # (changes to the base config as {dotted: value} or raw TOML text, extra arguments, words)
    "unknown key": ({"optim.learning_rate": 1e-3}, [], ["{config}", "unknown key optim.learning_rate"]),
    "unknown section": ({"optimm.lr": 1e-3}, [], ["[optimm]", "[optim]"]),
    "wrong type": ({"optim.lr": "fast"}, [], ["optim.lr = \"fast\"", "a number"]),
    "out of range": ({"lora.rank": 0}, [], ["lora.rank = 0", ">= 1"]),
    "choice typo": ({"turbo.mode": "adaptor"}, [], ["turbo.mode", "did you mean \"adapter\""]),
    "resolution below the bucket step": ({"data.resolutions": [48]}, [], ["data.resolutions", "48", ">= 64"]),
    "several problems on one line": ({"optim.lr": -1, "optim.steps": 0}, [], ["2 problems", "optim.lr = -1",
                                                                              "optim.steps = 0"]),
    "warmup past the steps": ({"optim.warmup_steps": 5, "optim.scheduler": "cosine"}, [],
                              ["optim.warmup_steps = 5", "< optim.steps (2)"]),
    "trigger mode without a trigger": ({"data.missing_caption": "trigger"}, [], ["data.trigger is required"]),
    "invalid TOML": ("[optim]\nlr = = 1\n", [], ["{config}", "invalid TOML"]),
    "not UTF-8": (b"[optim]\n# caf\xe9\n", [], ["{config}", "not UTF-8", "line 2"]),
    "missing transformer": ({"model.transformer": "{world}/Z-Image-Turbo"}, [],
                            ["model.transformer", "Z-Image-Turbo", "no such file"]),
    "missing VAE of a single-file transformer": (
        {"model.transformer": "{world}/a.safetensors", "model.text_encoder": "{world}/b.safetensors",
         "model.vae": "{world}/ae.safetensors"}, [], ["model.vae", "ae.safetensors", "no such file"]),
    "missing adapter": ({"turbo.mode": "adapter", "turbo.adapter": "{world}/adapter.safetensors"}, [],
                        ["turbo.adapter", "adapter.safetensors", "no such file"]),
    "adapter for another model size": ({"turbo.mode": "adapter",
                                        "turbo.adapter": "{world}/full_size_adapter.safetensors"}, [],
                                       ["full_size_adapter.safetensors", "the model's weight"]),
    "adapter folder without a LoRA": ({"turbo.mode": "adapter", "turbo.adapter": "{world}/folder"}, [],
                                      ["folder", "adapter_model.safetensors"]),
    "missing teacher prompts": ({"turbo.mode": "distill", "turbo.adapter": "{world}/a.safetensors",
                                 "turbo.teacher_prompts": "{world}/prompts_missing.txt"}, [],
                                ["turbo.teacher_prompts", "prompts_missing.txt"]),
    "missing turbo preview model": ({"model.family": "base", "turbo.mode": "base",
                                     "preview.turbo_model": "{world}/turbo.safetensors"}, [],
                                    ["preview.turbo_model", "turbo.safetensors"]),
    "output folder is a file": ({"save.output_dir": "{world}/afile"}, [], ["save.output_dir", "is a file"]),
    "output folder under a file": ({"save.output_dir": "{world}/afile/runs"}, [],
                                   ["save.output_dir", "afile is a file"]),
    "cache folder is a file": ({"data.cache_dir": "{world}/afile"}, [], ["data.cache_dir", "is a file"]),
    "run folder is a file": ({"save.output_dir": "{world}", "save.name": "afile"}, [],
                             ["run folder", "afile", "is a file"]),
    "resume without a state": ({}, ["--resume"], ["nothing to resume", "no saved training state"]),
    "resume and overwrite": ({}, ["--resume", "--overwrite"], ["--resume and --overwrite"]),
    "dataset folder missing": ({"data.dataset": "{world}/nowhere"}, [], ["data.dataset", "nowhere"]),
    "dataset is a file": ({"data.dataset": "{world}/afile"}, [], ["data.dataset", "is a file"]),
    "dataset without images": ({"data.dataset": "{world}/empty"}, [], ["empty", "no usable images"]),
    "image without a caption": ({"data.dataset": "{world}/nocap"}, [], ["a.png", "no caption file a.txt"]),
    "unreadable image": ({"data.dataset": "{world}/corrupt", "data.bad_image": "error"}, [],
                         ["circle_00.png", "not a readable image"]),
    "every image too small": ({"data.dataset": "{world}/small"}, [], ["small", "too small", "min_side=32"]),
    "caption not UTF-8": ({"data.dataset": "{world}/badcap"}, [], ["circle_00.txt", "not UTF-8"]),
    "batch larger than every bucket": ({"data.batch_size": 64, "data.drop_last": True}, [],
                                       ["data.drop_last = true", "batch 64", "no batch to train on"]),
}


@pytest.mark.parametrize("change, extra, words", list(TRAIN_CASES.values()), ids=list(TRAIN_CASES))
def test_training_refusal(world, tmp_path, capsys, change, extra, words):
    config, out = tmp_path / "run.toml", tmp_path / "out"
    write_config(config, out, world, change)
    before = snapshot(world)
    code, _, err = run_cli(capsys, ["train", "--config", config, *extra])
    assert_refused(code, err, fill(words, {"world": world, "config": config}))
    assert not out.exists()  # no run, output or cache folder
    assert snapshot(world) == before


def test_an_earlier_run_is_not_overwritten_and_a_refused_run_leaves_its_folder_as_it_was(world, tmp_path,
                                                                                         capsys):
    config, out = tmp_path / "run.toml", tmp_path / "out"
    write_config(config, out, world, {})
    run_dir = out / "run"
    run_dir.mkdir(parents=True)
    write_lora(random_lora(4, TINY_SPEC, seed=5), run_dir / "run-step000100.safetensors")
    (run_dir / "latest").write_text(json.dumps({"step": 100, "lora": "run-step000100.safetensors",
                                                "state": None}))
    before = snapshot(out)
    code, _, err = run_cli(capsys, ["train", "--config", config])
    assert_refused(code, err, [str(run_dir), "'run'", "--resume", "--overwrite", "run-step000100"])
    code, _, err = run_cli(capsys, ["train", "--config", config, "--resume"])  # a LoRA but no state
    assert_refused(code, err, ["nothing to resume", str(run_dir)])
    assert snapshot(out) == before


def test_the_resolution_bound_is_the_dataset_bucket_step():
    from trainer.data import load_dataset

    step = inspect.signature(load_dataset).parameters["bucket_step"].default
    assert FIELDS["data.resolutions"].ge == step == 64
    with pytest.raises(ConfigError, match=r"data\.resolutions = \[48\]"):
        check_field("data.resolutions", [48])

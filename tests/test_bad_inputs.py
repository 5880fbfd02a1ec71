"""The catalogue of bad input: every refusal is one line, early, and loses nothing.

Each case runs the real command line in this process (`trainer.cli.main`) on real files: a refusal exits
with code 2 and writes exactly one stderr line, `error: ...`, naming the file, key, field or value, with no
traceback; nothing is written (no output file, no run or output folder) and every input keeps its bytes and
its modification time. Training refusals use the tiny model and come before it loads: the lines a run
prints while checking (memory plan, model family) are held back, so the error line is all there is.
Permission errors run in a subprocess that cannot bypass file modes (root without CAP_DAC_OVERRIDE). The
node and route cases call what the ComfyUI pack runs for them without ComfyUI: the /zit/jobs request
checks (nodes/jobs.py, nodes/routes.py) and the engine functions the nodes call. A real `python -m trainer
train` is interrupted twice with SIGINT during its save and must exit 130 without an abort.
"""

from __future__ import annotations

import ast
import asyncio
import ctypes
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from trainer.cli import main
from trainer.config import ConfigError, check_field
from trainer.config_fields import FIELDS
from trainer.demo import make_dataset
from trainer.errors import ZitError
from trainer.lora.any_file import read_any
from trainer.lora.blocks import resolve
from trainer.lora.formats import read_lora
from trainer.lora.spec import ZIT, diffusers_name
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora
from trainer.tiny import TINY_SPEC

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
KEYS = [k for k in ZIT.module_keys() if k[0] in ("L00", "L29", "NR0")]
BIG = ("L29", "w2")  # the module of big.safetensors whose values overflow fp16
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the files every case reads ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs shared by the cases (never written: each case checks their bytes and times)."""
    root = tmp_path_factory.mktemp("world")
    write_lora(random_lora(4, keys=KEYS, seed=1), root / "a.safetensors", dialect="kohya")
    write_lora(random_lora(2, keys=KEYS[:8], seed=2), root / "b.safetensors", dialect="comfy")
    big = random_lora(2, keys=KEYS[:4] + [BIG], seed=3)
    big.modules[BIG].b.mul_(1e6)  # |dW| factors ~2e4: fine in fp32 and bf16, too large for fp16
    write_lora(big, root / "big.safetensors", dtype=torch.float32)
    lokr = {"lycoris_layers_0_attention_to_q.lokr_w1": torch.randn(16, 16) * 0.1,
            "lycoris_layers_0_attention_to_q.lokr_w2": torch.randn(240, 240) * 0.1}
    from safetensors.torch import save_file

    save_file(lokr, str(root / "lokr.safetensors"))
    (root / "junk.safetensors").write_bytes(b"not a safetensors file")
    (root / "afile").write_text("a file, not a folder")
    (root / "folder").mkdir()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("keep")
    shutil.copy(root / "b.safetensors", root / "existing.safetensors")
    (root / "existing.png").write_bytes(b"an earlier heatmap")
    images = make_dataset(root / "images", n=2, size=SIZE)
    (root / "empty").mkdir()
    (root / "nocap").mkdir()
    shutil.copy(images / "circle_00.png", root / "nocap" / "a.png")
    shutil.copytree(images, root / "corrupt")
    (root / "corrupt" / "circle_00.png").write_bytes(b"not a png")
    make_dataset(root / "small", n=2, size=16)
    shutil.copytree(images, root / "badcap")
    (root / "badcap" / "circle_00.txt").write_bytes(b"\xff\xfe a caption in UTF-16")
    write_lora(random_lora(2, keys=KEYS[:3], seed=4), root / "full_size_adapter.safetensors")
    (root / "prompts.txt").write_text("a red circle\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root: size, modification time (ns) and SHA-256."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[Any]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, words: list[str]) -> str:
    """Exit code 2, exactly one stderr line `error: ...` containing every word, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def fill(items: list[str], names: dict[str, Path]) -> list[str]:
    return [item.format(**{k: str(v) for k, v in names.items()}) for item in items]


# ---- the command line and the LoRA tools -----------------------------------------------------------------

CLI_CASES = {
    # argparse: one line, not the usage block
    "no command": ([], ["python -m trainer", "required"]),
    "unknown command": (["bogus"], ["bogus", "invalid choice"]),
    "train without --config": (["train"], ["--config"]),
    "unknown option": (["lora", "inspect", "{world}/a.safetensors", "--bogus"], ["--bogus"]),
    "ratio not a number": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "x"],
                           ["--ratio", "'x'"]),
    "scale without --ratio": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}"], ["--ratio"]),
    "unknown dialect": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--to", "klingon"],
                        ["klingon"]),
    "demo steps not a number": (["demo", "--steps", "many"], ["--steps", "'many'"]),
    # inputs
    "inspect a missing file": (["lora", "inspect", "{world}/missing.safetensors"],
                               ["missing.safetensors", "no such file"]),
    "inspect a junk file": (["lora", "inspect", "{world}/junk.safetensors"],
                            ["junk.safetensors", "not a readable .safetensors"]),
    "inspect a folder": (["lora", "inspect", "{world}/folder"], ["folder", "adapter_model.safetensors"]),
    "read as the wrong dialect": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--from",
                                   "comfy"], ["a.safetensors", "key"]),
    "merge a missing input": (["lora", "merge", "{world}/a.safetensors", "{world}/missing.safetensors",
                               "-o", "{new}"], ["missing.safetensors", "no such file"]),
    "a LoKr without a rank": (["lora", "convert", "{world}/lokr.safetensors", "-o", "{new}"],
                              ["lokr.safetensors", "--rank N"]),
    "merge a LoKr without a rank": (["lora", "merge", "{world}/a.safetensors", "{world}/lokr.safetensors",
                                     "-o", "{new}"], ["lokr.safetensors", "--rank N"]),
    # outputs: never over a file or an input without --overwrite, checked before any input is read
    "heatmap over the input": (["lora", "inspect", "{world}/a.safetensors", "--heatmap",
                                "{world}/a.safetensors"], ["--heatmap", "a.safetensors", "is also an input"]),
    "heatmap over a file": (["lora", "inspect", "{world}/a.safetensors", "--heatmap", "{world}/existing.png"],
                            ["existing.png", "already exists", "--overwrite"]),
    "metric without heatmap": (["lora", "inspect", "{world}/a.safetensors", "--metric", "erank"],
                               ["--metric erank", "--heatmap"]),
    "convert over an existing file": (["lora", "convert", "{world}/a.safetensors", "-o",
                                       "{world}/existing.safetensors"],
                                      ["existing.safetensors", "--overwrite"]),
    "convert over its input": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/a.safetensors"],
                               ["a.safetensors", "is also an input"]),
    "convert, old form, over its input": (["lora", "convert", "{world}/a.safetensors",
                                           "{world}/a.safetensors"], ["a.safetensors", "is also an input"]),
    "scale over its input": (["lora", "scale", "{world}/a.safetensors", "-o", "{world}/a.safetensors",
                              "--ratio", "2"], ["a.safetensors", "is also an input"]),
    "merge over an input": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o",
                             "{world}/b.safetensors"], ["b.safetensors", "is also an input"]),
    "merge, old form (output first)": (["lora", "merge", "{new}", "{world}/a.safetensors",
                                        "{world}/b.safetensors"], ["lora merge", "-o OUT", "no longer"]),
    "output is a folder": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/folder"],
                           ["folder", "is a folder"]),
    "output under a file": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/afile/x.safetensors"],
                            ["afile", "is a file, not a folder"]),
    "two outputs": (["lora", "convert", "{world}/a.safetensors", "{new}", "-o", "{new}"], ["two outputs"]),
    "no output": (["lora", "convert", "{world}/a.safetensors"], ["no output", "-o OUT"]),
    # values that would write Inf/NaN, named by module
    "fp16 overflow": (["lora", "convert", "{world}/big.safetensors", "-o", "{new}", "--dtype", "fp16"],
                      ["new.safetensors", diffusers_name(BIG), "fp16"]),
    "ratio overflows fp16": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1e30",
                              "--dtype", "fp16"], ["new.safetensors", "module", "fp16"]),
    "ratio overflows fp32": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1e300"],
                             ["new.safetensors", "module", "not finite"]),
    "ratio nan": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "nan"],
                  ["--ratio nan", "finite"]),
    "ratio inf": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "inf"],
                  ["--ratio inf", "finite"]),
    "merge ratio nan": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--ratio", "nan"],
                        ["--ratio nan"]),
    # contradictory or out-of-range options
    "exact merge with a rank": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o",
                                 "{new}", "--rank", "4"], ["--rank", "--mode exact", "--mode svd"]),
    "svd merge without a target": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode", "svd"],
                                   ["--rank", "--energy"]),
    "svd merge with rank and energy": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode",
                                        "svd", "--rank", "4", "--energy", "0.5"], ["exactly one"]),
    "ratio count": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o", "{new}",
                     "--ratio", "1", "--ratio", "2", "--ratio", "3"], ["--ratio given 3 times for 2 inputs"]),
    "energy above 1": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode", "svd", "--energy",
                        "1.5"], ["--energy 1.5"]),
    "rank 0": (["lora", "convert", "{world}/lokr.safetensors", "-o", "{new}", "--rank", "0"], ["--rank 0"]),
    "rank with a plain LoRA": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--rank", "2"],
                               ["a.safetensors", "plain LoRA"]),
    "unknown block": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1", "--blocks",
                       "L40=1"], ["L40"]),
    "block vector length": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1",
                             "--blocks", "1,2,3"], ["3"]),
    "unknown component": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1",
                           "--components", "zz=1"], ["zz"]),
    # demos: an output folder that is a file or not empty
    "demo steps 0": (["demo", "--steps", "0", "-o", "{new}"], ["--steps 0"]),
    "demo into a file": (["demo", "-o", "{world}/afile"], ["afile", "is a file"]),
    "demo into a used folder": (["demo", "-o", "{world}/nonempty"], ["nonempty", "not empty", "--overwrite"]),
    "lora demo into a used folder": (["lora", "demo", "-o", "{world}/nonempty"], ["nonempty", "--overwrite"]),
    # plan
    "plan: bad --vram": (["plan", "--config", "{good}", "--vram", "lots"], ["--vram", "lots"]),
    "plan: bad --card": (["plan", "--config", "{good}", "--card", "12XB"], ["--card", "12XB"]),
    "plan: --text-tokens 0": (["plan", "--config", "{good}", "--text-tokens", "0"], ["--text-tokens 0"]),
    "plan: missing config": (["plan", "--config", "{world}/missing.toml"], ["missing.toml", "no such file"]),
}


def base_config(out: Path, images: Path) -> dict[str, dict[str, Any]]:
    """A tiny fp32 run writing to `out` (which does not exist yet)."""
    return {
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(images), "resolutions": [SIZE], "min_side": 32, "caption_dropout": 0.0},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 2, "seed": 0},
        "save": {"output_dir": str(out), "name": "run", "every": 0},
        "preview": {"every": 0, "health_every": 0},
    }


@pytest.mark.parametrize("argv, words", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_cli_refusal(world, tmp_path, capsys, argv, words):
    good = tmp_path / "good.toml"
    good.write_text(tomli_w.dumps(base_config(tmp_path / "out", world / "images")))
    names = {"world": world, "new": tmp_path / "new.safetensors", "good": good}
    before = snapshot(world)
    code, _, err = run_cli(capsys, fill(argv, names))
    assert_refused(code, err, fill(words, names))
    assert snapshot(world) == before  # inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.toml"]  # nothing written


# ---- training: the config, the run folder and the dataset --------------------------------------------------

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


def write_config(path: Path, out: Path, world: Path, change: dict | str | bytes) -> None:
    if isinstance(change, bytes):
        path.write_bytes(change)
        return
    if isinstance(change, str):
        path.write_text(change)
        return
    d = base_config(out, world / "images")
    for dotted, value in change.items():
        section, key = dotted.split(".")
        if isinstance(value, str):
            value = value.format(world=world)
        d.setdefault(section, {})[key] = value
    path.write_text(tomli_w.dumps(d))


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


# ---- permission errors (a process that cannot bypass file modes) -------------------------------------------

PERMISSION_CASES = {
    "config": (["train", "--config", "{locked}/run.toml"], ["run.toml", "permission denied"]),
    "LoRA": (["lora", "inspect", "{locked}/a.safetensors"], ["a.safetensors", "permission denied"]),
    "LoRA to merge": (["lora", "merge", "{world}/b.safetensors", "{locked}/a.safetensors", "-o", "{new}"],
                      ["a.safetensors", "permission denied"]),
    "output folder": (["lora", "convert", "{world}/b.safetensors", "-o", "{readonly}/x.safetensors"],
                      ["x.safetensors", "permission denied"]),
    "adapter named by the config": (["train", "--config", "{readable}/adapter.toml"],
                                    ["turbo.adapter", "permission denied"]),
    "dataset image": (["train", "--config", "{readable}/image.toml"], ["circle_00.png", "Permission denied"]),
    "dataset caption": (["train", "--config", "{readable}/caption.toml"],
                        ["circle_01.txt", "Permission denied"]),
}
_RUNNER = """
import contextlib, io, json, sys
from trainer.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _no_dac_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    even root is held to file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.skipif(os.name == "nt", reason="POSIX file modes")
def test_permission_errors_say_permission_denied(world, tmp_path):
    locked, readonly, readable = tmp_path / "locked", tmp_path / "readonly", tmp_path / "readable"
    for folder in (locked, readonly, readable):
        folder.mkdir()
    shutil.copy(world / "a.safetensors", locked / "a.safetensors")
    write_config(locked / "run.toml", tmp_path / "out", world, {})
    shutil.copy(world / "a.safetensors", readable / "adapter.safetensors")
    write_config(readable / "adapter.toml", tmp_path / "out", world,
                 {"turbo.mode": "adapter", "turbo.adapter": str(readable / "adapter.safetensors")})
    for name in ("image", "caption"):
        shutil.copytree(world / "images", readable / name)
        write_config(readable / f"{name}.toml", tmp_path / "out", world,
                     {"data.dataset": str(readable / name), "data.bad_image": "error"})
    for path in (locked / "a.safetensors", locked / "run.toml", readable / "adapter.safetensors",
                 readable / "image" / "circle_00.png", readable / "caption" / "circle_01.txt"):
        path.chmod(0)
    readonly.chmod(0o555)
    names = {"world": world, "locked": locked, "readonly": readonly, "readable": readable,
             "new": tmp_path / "new.safetensors"}
    argvs = [fill(argv, names) for argv, _ in PERMISSION_CASES.values()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=_no_dac_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot start a process without CAP_DAC_OVERRIDE: {exc}")
    finally:
        readonly.chmod(0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for (name, (_, words)), (code, err) in zip(PERMISSION_CASES.items(), results, strict=True):
        line = assert_refused(code, err, fill(words, names))
        assert "no such file" not in line, name
    assert not (tmp_path / "new.safetensors").exists() and not (tmp_path / "out").exists()
    assert not list(readonly.iterdir())


# ---- node and route cases ----------------------------------------------------------------------------------

PACK = "zit_pack_bad_inputs"


@pytest.fixture(scope="module")
def pack_nodes() -> types.SimpleNamespace:
    """nodes/jobs.py and nodes/routes.py imported the way ComfyUI imports the pack (as one package), without
    the node classes that need ComfyUI itself."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
        nodes = types.ModuleType(f"{PACK}.nodes")  # the package without its __init__ (which needs ComfyUI)
        nodes.__path__ = [str(REPO / "nodes")]
        sys.modules[nodes.__name__] = nodes
    return types.SimpleNamespace(jobs=importlib.import_module(f"{PACK}.nodes.jobs"),
                                 routes=importlib.import_module(f"{PACK}.nodes.routes"))


class Request:
    """The two things the /zit/jobs handlers read from an aiohttp request: the path's id and the body."""

    def __init__(self, job_id: str, body: bytes = b""):
        self.match_info, self._body = {"id": job_id}, body

    async def read(self) -> bytes:
        return self._body


def _run(pack_nodes, tmp_path: Path, release: threading.Event | None = None):
    """A finished (or, with `release`, running) job of a run in tmp_path with one saved LoRA and no state."""
    run_dir = tmp_path / "run"
    (run_dir / "previews").mkdir(parents=True)
    write_lora(random_lora(2, TINY_SPEC, seed=6), run_dir / "run-step000002.safetensors")
    (run_dir / "previews" / "step000002.png").write_bytes(b"png")

    def work(resume):
        return lambda ctx: release.wait(30) if release is not None else None

    run = pack_nodes.jobs.Run("run", run_dir, "run.safetensors", 10, work)
    job = pack_nodes.jobs.start(run)
    if release is None:
        assert job.wait(10)
    return job


ROUTE_CASES = {
    "unknown job": (lambda n, job: n.jobs.get("train-999"), 404, ["train-999"]),
    "stop a finished job": (lambda n, job: n.jobs.stop(job.id), 409, ["{job}", "already finished"]),
    "resume an unknown checkpoint": (lambda n, job: n.jobs.resume(job.id, "run-step000099.safetensors"), 400,
                                     ["run-step000099.safetensors", "not a checkpoint"]),
    "resume a checkpoint without a state": (
        lambda n, job: n.jobs.resume(job.id, "run-step000002.safetensors"), 400,
        ["run-step000002.safetensors", "without a training state"]),
    "resume a run without a state": (lambda n, job: n.jobs.resume(job.id), 409, ["no training state"]),
    "preview outside the run": (lambda n, job: n.jobs.preview_file(job.id, "../../run.toml"), 404,
                                ["../../run.toml"]),
    "body not JSON": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"{checkpoint"))), 400,
                      ["not JSON"]),
    "body not an object": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"[1]"))), 400,
                           ["JSON object"]),
    "body not UTF-8": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"\xff\xfe"))), 400,
                       ["not JSON"]),
}


@pytest.mark.parametrize("call, status, words", list(ROUTE_CASES.values()), ids=list(ROUTE_CASES))
def test_route_refusal(pack_nodes, tmp_path, call, status, words):
    job = _run(pack_nodes, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(pack_nodes.jobs.JobError) as caught:
        call(pack_nodes, job)
    message = str(caught.value)
    assert caught.value.status == status and "\n" not in message, message
    for word in fill(words, {"job": job.id}):
        assert word in message, (word, message)
    assert snapshot(tmp_path) == before


def test_a_second_training_job_is_refused_while_one_runs(pack_nodes, tmp_path):
    release = threading.Event()
    running = _run(pack_nodes, tmp_path / "a", release)
    try:
        with pytest.raises(pack_nodes.jobs.JobError) as caught:
            _run(pack_nodes, tmp_path / "b")
        assert caught.value.status == 409 and running.id in str(caught.value)
    finally:
        release.set()
        running.wait(10)


NODE_CASES = {
    # ZIT Train's advanced box: each key goes through check_field
    "advanced: unknown key": (lambda w: check_field("optim.learning_rate", 1e-3), ["optim.learning_rate"]),
    "advanced: bad value": (lambda w: check_field("lora.rank", -4), ["lora.rank = -4"]),
    # ZIT LoRA Loader / adapter attach: a LoRA for another model size, checked against the model's spec
    "LoRA for another model": (lambda w: read_any(w / "a.safetensors", spec=TINY_SPEC), ["a.safetensors"]),
    # the block-weight widget and the browser editor's resolve route
    "block weights text": (lambda w: resolve("L10-19=0.5,X3=1"), ["X3"]),
    # ZIT LoRA Merge & Save / Convert with dtype fp16
    "save as fp16 overflows": (
        lambda w: write_lora(read_lora(w / "big.safetensors"), w / "out_fp16.safetensors", dtype="fp16"),
        [diffusers_name(BIG), "fp16"]),
}


@pytest.mark.parametrize("call, words", list(NODE_CASES.values()), ids=list(NODE_CASES))
def test_node_refusal(world, call, words):
    before = snapshot(world)
    with pytest.raises(ZitError) as caught:
        call(world)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert snapshot(world) == before


# ---- the rules these cases rest on -------------------------------------------------------------------------


def test_the_resolution_bound_is_the_dataset_bucket_step():
    from trainer.data import load_dataset

    step = inspect.signature(load_dataset).parameters["bucket_step"].default
    assert FIELDS["data.resolutions"].ge == step == 64
    with pytest.raises(ConfigError, match=r"data\.resolutions = \[48\]"):
        check_field("data.resolutions", [48])


def _imports(path: Path, package: str) -> set[str]:
    """Modules of the trainer package that `path` imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = f"{base}.{node.module}" if node.module else base
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("trainer")}
    return found


def test_nothing_the_command_line_imports_imports_it_back():
    """No import circle through trainer.cli (e.g. cli -> lora.commands -> lora.demo -> cli)."""
    root = REPO / "trainer"
    importers = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        if name not in ("trainer.cli", "trainer.__main__") and "trainer.cli" in _imports(path, package):
            importers.append(name)
    assert importers == []


# ---- Ctrl+C ------------------------------------------------------------------------------------------------


def test_a_second_ctrl_c_during_the_save_exits_130_cleanly(world, tmp_path):
    config, out = tmp_path / "run.toml", tmp_path / "out"
    write_config(config, out, world, {"optim.steps": 100000})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any(line.startswith("step ") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        while not any(line.startswith("stopping: saving") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)  # while it finishes its step and saves
        proc.wait(timeout=60)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)  # stderr is read to its end by the reader alone
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Fatal" not in err and "FATAL" not in err, err[-3000:]
    assert "quit without waiting for the save" in err or "LoRA:" in stdout, err[-2000:]
    # whatever was being written, every LoRA file in the run folder is whole
    for path in (out / "run").glob("*.safetensors"):
        assert read_lora(path).spec == TINY_SPEC, path

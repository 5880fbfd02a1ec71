"""The training loop from the command line and the bench scripts: `train --config` trains from a TOML file,
an unknown key exits 2 with one line naming it, and the benches' --dry-run modes run their CUDA code paths
through the engine on the CPU.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _loop_helpers import cache as cache  # a fixture (module-scoped here)
from _loop_helpers import images as images  # a fixture (module-scoped here)
from _loop_helpers import make_config

from trainer.cli import main as cli_main
from trainer.config import config_to_toml
from trainer.lora.formats import read_lora

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_trains_from_a_toml_config(tmp_path, images, cache, capsys):
    cfg = make_config(tmp_path, images, cache, optim={"steps": 3})
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg))
    assert cli_main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    final = cfg.run_dir / "run.safetensors"
    assert f"LoRA: {final} (step 3)" in out
    assert read_lora(final).metadata["zit.step"] == "3"


def test_cli_unknown_key_exits_2_with_one_line_naming_it(tmp_path, images):
    cfg = make_config(tmp_path, images)
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg).replace("[optim]\n", "[optim]\nlearning_rate = 0.001\n"))
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.learning_rate" in lines[0] and str(path) in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_train_bench_dry_run_runs_the_cuda_code_path_on_the_cpu(monkeypatch, capsys):
    """The bench's GPU mode cannot run here; its --dry-run keeps that code in step with the engine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["train_bench.py", "--dry-run", "--steps", "1", "--warmup", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "diffusers + peft reference" in out and "engine Trainer.train_step" in out
    assert bench.step_flops(bench.Case(bench.ZIT, 1024, 512, 32, torch.bfloat16, torch.device("cpu"), True),
                            6_154_908_736) == pytest.approx(2.01e14, rel=0.01)  # 3 x (2 N L + attn)


def test_gpu_suite_dry_run_runs_every_memory_plan_on_the_cpu(monkeypatch, capsys):
    """bench/gpu_suite.py's rows (reference, bf16, fp8, fp8 + swap at two depths) run through the Trainer."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)
    spec.loader.exec_module(suite)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--dry-run"])
    suite.main()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("bf16", "fp8"))]
    rows = {line.split("  ")[0]: line.split() for line in lines}
    assert set(rows) == {"bf16", "fp8", "fp8 + swap (K=2)", "fp8 + swap (K=1)"}, out
    loads = {name: float(cells[-1]) for name, cells in rows.items()}  # blocks copied in per step
    assert loads == {"bf16": 0, "fp8": 0, "fp8 + swap (K=2)": 0, "fp8 + swap (K=1)": 2}, out

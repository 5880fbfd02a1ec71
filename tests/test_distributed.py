"""Data parallelism: `torchrun` (accelerate's launcher underneath) starting 2 CPU processes (gloo) of the real
CLI on the tiny model.

- 2 processes x batch 1, stopped at step 2 and resumed to step 4 under torchrun, give the LoRA of 1 process
  x batch 2 trained straight to step 4 (to fp32 rounding); only process 0 reports and writes;
- a resume with another global batch is refused in one line (exit 2); the same global batch resumes;
- a process killed mid-run ends the whole job, and its last checkpoint stays readable;
- configs that differ between processes, and batches that cannot be split, are refused in one line;
- distill mode splits its teacher trajectories over the processes and trains on the shared cache.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import find_latest_checkpoint
from trainer.config import config_from_dict, config_to_toml
from trainer.demo import make_dataset
from trainer.lora.formats import read_lora

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo backend: 2 CPU processes cannot form a group")


def write_config(path: Path, out: Path, images: Path, batch_size: int, steps: int, **extra: object) -> Path:
    sections: dict[str, dict] = {
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(images), "resolutions": [SIZE], "min_side": 32, "caption_dropout": 0.0,
                 "batch_size": batch_size, "cache_dir": str(out / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": steps, "seed": 0},
        "save": {"output_dir": str(out), "name": "run", "every": 2},
        "preview": {"every": 0, "health_every": 0},
    }
    for dotted, value in extra.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    path.write_text(config_to_toml(config_from_dict(sections, source="test"), comments=False))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m trainer ...` (what accelerate launch runs)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer", *args]
    return subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp") / "images", n=4, size=SIZE)


def test_two_processes_match_one_process_with_the_global_batch_and_resume(tmp_path, images):
    ddp = write_config(tmp_path / "ddp.toml", tmp_path / "ddp", images, batch_size=1, steps=2)
    first = torchrun("train", "--config", str(ddp))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stderr.count("data parallel: 2 processes (gloo") == 1  # process 0 alone reports
    assert "global batch 2 = data.batch_size 1 x 2 processes" in first.stderr
    assert first.stderr.count("checkpoint: ") == 1 and first.stdout.count("LoRA: ") == 1
    write_config(ddp, tmp_path / "ddp", images, batch_size=1, steps=4)
    resumed = torchrun("train", "--config", str(ddp), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    one = write_config(tmp_path / "one.toml", tmp_path / "one", images, batch_size=2, steps=4)
    straight = single("train", "--config", str(one))
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = load_file(str(tmp_path / "ddp" / "run" / "run.safetensors"))
    b = load_file(str(tmp_path / "one" / "run" / "run.safetensors"))
    assert a.keys() == b.keys()
    learned = [k for k in b if "lora_B" in k]  # B starts at zero: it is all update
    assert learned and all(float(b[k].abs().max()) > 0 for k in learned)
    gap = sum(float((a[k] - b[k]).pow(2).sum()) for k in learned) ** 0.5
    size = sum(float(b[k].pow(2).sum()) for k in learned) ** 0.5
    # fp32 rounding of batch-1 vs batch-2 matmuls, through 4 Adam steps: measured 6.5e-6 relative
    assert gap <= 1e-4 * size, f"2 x 1 differs from 1 x 2 by {gap / size:.2e} (relative, Frobenius)"
    assert sorted(p.name for p in (tmp_path / "ddp" / "run").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "run").iterdir())  # nothing extra from process 1

    # another number of processes: the same global batch continues, another one is refused
    shutil.copytree(tmp_path / "ddp" / "run", tmp_path / "cross" / "run")
    cross = write_config(tmp_path / "cross.toml", tmp_path / "cross", images, batch_size=1, steps=6)
    refused = single("train", "--config", str(cross), "--resume")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
    assert "global batch of 2" in refused.stderr and "this run has 1" in refused.stderr
    write_config(cross, tmp_path / "cross", images, batch_size=2, steps=5)
    assert single("train", "--config", str(cross), "--resume").returncode == 0


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The trainer processes a torchrun started, by RANK (read from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if int(stat[3]) == launcher.pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_a_killed_process_ends_the_job_and_the_last_checkpoint_is_intact(tmp_path, images):
    config = write_config(tmp_path / "run.toml", tmp_path, images, batch_size=1, steps=400)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "trainer", "train", "--config", str(config)]
    launcher = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        deadline = time.monotonic() + 90
        while find_latest_checkpoint(tmp_path / "run", "run") is None:
            assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint was written"
            time.sleep(0.2)
        os.kill(_rank_pids(launcher)[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    ckpt = find_latest_checkpoint(tmp_path / "run", "run")
    assert ckpt.step >= 2 and ckpt.state is not None
    assert read_lora(ckpt.lora).metadata["zit.step"] == str(ckpt.step)  # a whole file, not a torn one
    assert "error: process 0: the launcher ended this job (another process stopped)" in err
    assert "/trainer/" not in err  # the only traceback is torchrun's own report, none from our code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_configs_that_differ_between_processes_are_refused(tmp_path, images):
    port = str(_free_port())
    procs = []
    for rank, lr in ((0, 1e-2), (1, 2e-2)):
        config = write_config(tmp_path / f"rank{rank}.toml", tmp_path, images, batch_size=1, steps=2,
                              optim__lr=lr)
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2]
    assert results[0][1].strip().splitlines() == [
        "error: the config of process 1 differs from process 0's: every process must read the same run.toml "
        "(and the same data)"]
    assert results[1][1].strip() == ""  # process 0 speaks for the job
    assert not (tmp_path / "run").exists()


def test_batches_that_cannot_be_split_are_refused(tmp_path):
    three = make_dataset(tmp_path / "three", n=3, size=SIZE)
    config = write_config(tmp_path / "run.toml", tmp_path, three, batch_size=1, steps=2)
    result = torchrun("train", "--config", str(config))
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: data.drop_last = false: the 64x64 bucket has 3 samples per epoch, not a multiple "
                    "of the global batch 2 (batch_size 1 x 2 processes), so its last batch cannot be split "
                    "evenly; set data.drop_last = true or change data.batch_size, data.repeats or the number "
                    "of processes"]


def test_distill_mode_splits_its_teacher_work_over_two_processes(tmp_path, images):
    from trainer.demo import make_adapter

    sft = make_adapter(tmp_path / "sft.safetensors", seed=3)
    config = write_config(tmp_path / "run.toml", tmp_path, images, batch_size=1, steps=2,
                          turbo__mode="distill", turbo__adapter=str(sft), turbo__teacher_steps=8,
                          turbo__teacher_seeds=1)
    result = torchrun("train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "trajectories").glob("*.safetensors"))) == 4  # 4 captions x 1 seed
    assert (tmp_path / "run" / "run_merged.safetensors").is_file()
    assert read_lora(tmp_path / "run" / "run.safetensors").metadata["zit.mode"] == "distill"

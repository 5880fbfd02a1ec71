"""Atomic writes, the checkpoint layout, pruning, crash safety and a bit-exact resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainer import checkpoint as ck
from trainer.checkpoint import (
    Checkpoint,
    CheckpointError,
    TrainingObjects,
    atomic_write,
    atomic_write_dir,
    clean_stale_temps,
    find_latest_checkpoint,
    list_checkpoints,
    load_training_state,
    lora_path,
    save_checkpoint,
    save_training_state,
    state_path,
)
from trainer.config import OptimConfig
from trainer.optim import Ema, build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_text(text: str):  # noqa: ANN202 - a write_fn
    return lambda p: Path(p).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"
    assert atomic_write(target, _write_text("one")) == target
    atomic_write(target, _write_text("two"))
    assert target.read_text() == "two" and os.listdir(target.parent) == ["a.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fails_midway(p: Path) -> None:
        p.write_text("half of the new con")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_midway)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, lambda p: (p.write_text("x"), (_ for _ in ()).throw(KeyboardInterrupt()))[0])
    assert os.listdir(tmp_path) == ["a.txt"]


def test_temp_left_by_a_crashed_process_is_ignored_then_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    dead = tmp_path / f".a.txt.tmp-{_dead_pid()}-0123abcd"
    dead.write_text("partial")
    alive = tmp_path / f".a.txt.tmp-{os.getppid()}-0123abcd"  # a live process may still be writing it
    alive.write_text("in progress")
    assert list_checkpoints(tmp_path) == [] and target.read_text() == "old"
    atomic_write(target, _write_text("new"))
    assert target.read_text() == "new" and not dead.exists() and alive.exists()


def test_atomic_write_dir_replaces_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "d"

    def files(*names: str):  # noqa: ANN202
        return lambda p: [(p / n).write_text(n) for n in names]

    atomic_write_dir(target, files("a", "b"))
    atomic_write_dir(target, files("c"))
    assert sorted(os.listdir(target)) == ["c"] and os.listdir(tmp_path) == ["d"]

    def broken(p: Path) -> None:
        (p / "x").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write_dir(target, broken)
    assert sorted(os.listdir(target)) == ["c"] and os.listdir(tmp_path) == ["d"]


# ---------------------------------------------------------------------------------------------- a tiny run


class ToySampler:
    """A shuffling index sampler with its own generator, like the data module's."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen).tolist(), 0

    def next(self) -> int:
        if self.pos == self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen).tolist(), 0
        self.pos += 1
        return self.order[self.pos - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "pos": self.pos, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.pos = list(state["order"]), state["pos"]
        self.gen.set_state(state["gen"])


OPTIM = OptimConfig(scheduler="cosine_with_restarts", warmup_steps=2, steps=12, restarts=2, lr=1e-2, ema=True)
DATA = torch.linspace(-1, 1, 5 * 6).reshape(5, 6)


def _objects(seed: int) -> TrainingObjects:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params = dict(model.named_parameters())
    opt = build_optimizer(params.values(), OPTIM)
    return TrainingObjects(
        params=params,
        optimizer=opt,
        scheduler=build_scheduler(opt, OPTIM),
        ema=Ema(params.values(), decay=0.9),
        sampler=ToySampler(5, seed),
        generators={"noise": torch.Generator().manual_seed(seed + 1)},
    )


def _train(obj: TrainingObjects, start: int, stop: int) -> None:
    """Steps whose data depends on every random stream, so a bad restore changes the result."""
    model_params = list(obj.params.values())
    w1, b1, w2, b2 = model_params
    for step in range(start, stop):
        x = DATA[obj.sampler.next()]
        x = x + 0.1 * torch.randn(6, generator=obj.generators["noise"]) + 0.01 * torch.randn(6)
        x = x * (1 + 0.01 * random.random()) * (1 + 0.01 * float(np.random.rand()))
        y = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        loss = (y - torch.tensor([0.5, -0.5])).pow(2).mean()
        obj.optimizer.zero_grad()
        loss.backward()
        obj.optimizer.step()
        obj.scheduler.step()
        obj.ema.update(step)


def _snapshot(obj: TrainingObjects) -> list[torch.Tensor]:
    opt_state = [t for s in obj.optimizer.state.values() for t in s.values()]
    lr = torch.tensor([g["lr"] for g in obj.optimizer.param_groups], dtype=torch.float64)
    return [*(p.detach().clone() for p in obj.params.values()), *obj.ema.shadow, *opt_state, lr]


def _lora_writer(obj: TrainingObjects):  # noqa: ANN202 - a write_lora
    from safetensors.torch import save_file

    return lambda p: save_file({k: v.detach().to(torch.bfloat16) for k, v in obj.params.items()}, str(p))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    _seed_all(0)
    run = _objects(seed=1)
    _train(run, 0, 5)
    ckpt = save_checkpoint(tmp_path, "toy", 5, _lora_writer(run), run, config={"optim": {"lr": 0.01}})
    _train(run, 5, 12)
    expected = _snapshot(run)

    _seed_all(123)  # every stream elsewhere; the load must bring them back
    resumed = _objects(seed=7)
    info = load_training_state(ckpt.state, resumed)
    assert info.step == 5 and info.config == {"optim": {"lr": 0.01}} and info.path == ckpt.state
    _train(resumed, info.step, 12)
    got = _snapshot(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert resumed.scheduler.last_epoch == run.scheduler.last_epoch == 12


def test_rng_streams_continue_identically(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    obj = TrainingObjects(params={}, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    obj.generators = {"g": gen}
    _seed_all(5)
    save_training_state(tmp_path / "s", obj, step=0)

    def draw() -> tuple:
        return (
            random.random(),
            float(np.random.rand()),
            torch.rand(3).tolist(),
            torch.rand(2, generator=gen).tolist(),
        )

    first = draw()
    _seed_all(99)
    gen.manual_seed(99)
    load_training_state(tmp_path / "s", obj)
    assert draw() == first
    with pytest.raises(CheckpointError, match="no RNG state for generator 'other'"):
        load_training_state(tmp_path / "s", TrainingObjects({}, obj.optimizer, generators={"other": gen}))


def test_load_refuses_mismatched_or_incomplete_states(tmp_path: Path) -> None:
    run = _objects(seed=1)
    save_training_state(tmp_path / "s", run, step=1)
    other = _objects(seed=1)
    other.params = {**other.params, "extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"trainable tensors differ: missing \['extra'\]"):
        load_training_state(tmp_path / "s", other)
    (tmp_path / "s" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete training state"):
        load_training_state(tmp_path / "s", _objects(seed=1))


def test_missing_parts_start_fresh_with_a_warning(tmp_path: Path) -> None:
    run = _objects(seed=1)
    bare = TrainingObjects(run.params, run.optimizer)
    save_training_state(tmp_path / "s", bare, step=1)
    with pytest.warns(UserWarning, match="no EMA state saved"):
        load_training_state(tmp_path / "s", TrainingObjects(run.params, run.optimizer, ema=run.ema))


# ---------------------------------------------------------------------------------------- layout and pruning


def test_layout_listing_and_latest(tmp_path: Path) -> None:
    run = _objects(seed=1)
    save_checkpoint(tmp_path, "toy", 250, _lora_writer(run), run)
    ckpt = save_checkpoint(tmp_path, "toy", 500, _lora_writer(run), None)
    assert ckpt == Checkpoint(500, lora_path(tmp_path, "toy", 500), None)
    assert sorted(os.listdir(tmp_path)) == [
        "latest", "state-step000250", "toy-step000250.safetensors", "toy-step000500.safetensors"
    ]  # fmt: skip
    assert sorted(os.listdir(state_path(tmp_path, 250))) == [
        "config.json",
        "meta.json",
        "params.safetensors",
        "state.pt",
    ]
    marker = {"step": 500, "lora": "toy-step000500.safetensors", "state": None}
    assert json.loads((tmp_path / "latest").read_text()) == marker
    assert [c.step for c in list_checkpoints(tmp_path, "toy")] == [250, 500]
    assert find_latest_checkpoint(tmp_path, "toy").step == 500
    (tmp_path / "latest").write_text("{not json")
    assert find_latest_checkpoint(tmp_path, "toy").step == 250  # no marker: the newest resumable one
    assert (
        list_checkpoints(tmp_path / "missing") == [] and find_latest_checkpoint(tmp_path / "missing") is None
    )


def test_list_defaults_to_the_run_folder_name(tmp_path: Path) -> None:
    run_dir = tmp_path / "my_run"
    save_checkpoint(run_dir, "my_run", 3, _write_text("lora"))
    assert list_checkpoints(run_dir) == [Checkpoint(3, lora_path(run_dir, "my_run", 3), None)]


def test_keep_last_prunes_only_its_own_older_files(tmp_path: Path) -> None:
    run = _objects(seed=1)
    foreign = ["notes.txt", "toy.safetensors", "other-step000001.safetensors", "toy-step1.safetensors"]
    for name in foreign:
        (tmp_path / name).write_text("mine")
    (tmp_path / "state-step000900").mkdir()  # not ours (incomplete): never touched
    future = save_checkpoint(tmp_path, "toy", 9000, _write_text("abandoned run"), None)
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, "toy", step, _lora_writer(run), run, keep_last=2)
    assert [(c.step, c.state is not None) for c in list_checkpoints(tmp_path, "toy")] == [
        (4, True), (5, True), (9000, False)
    ]  # fmt: skip
    assert all((tmp_path / name).read_text() == "mine" for name in foreign)
    assert (tmp_path / "state-step000900").is_dir() and future.lora.exists()
    assert find_latest_checkpoint(tmp_path, "toy").step == 5
    save_checkpoint(tmp_path, "toy", 6, _lora_writer(run), run, keep_last=1)
    assert [c.step for c in list_checkpoints(tmp_path, "toy")] == [6, 9000]
    save_checkpoint(tmp_path, "toy", 7, _lora_writer(run), run, keep_last=0)
    assert [c.step for c in list_checkpoints(tmp_path, "toy")] == [6, 7, 9000]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    run = _objects(seed=1)
    save_checkpoint(tmp_path, "toy", 5, _lora_writer(run), run)
    _train(run, 5, 6)
    ckpt = save_checkpoint(tmp_path, "toy", 5, _lora_writer(run), run)
    fresh = _objects(seed=2)
    load_training_state(ckpt.state, fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.params.values(), run.params.values(), strict=True))
    assert sorted(os.listdir(tmp_path)) == ["latest", "state-step000005", "toy-step000005.safetensors"]


# ---------------------------------------------------------------------------------------------- crash safety


def test_crash_before_the_state_rename_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run = _objects(seed=1)
    save_checkpoint(tmp_path, "toy", 1, _lora_writer(run), run)
    _train(run, 1, 3)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name.startswith("state-"):
            raise OSError("killed between temp write and rename")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, "toy", 3, _lora_writer(run), run)
    monkeypatch.undo()
    latest = find_latest_checkpoint(tmp_path, "toy")
    assert latest.step == 1 and latest.state == state_path(tmp_path, 1)
    assert load_training_state(latest.state, _objects(seed=2)).step == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_killed_process_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """A real kill (os._exit) inside the state rename; the next save cleans what it left."""
    script = textwrap.dedent(
        f"""
        import os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        from trainer import checkpoint as ck
        p = torch.nn.Parameter(torch.ones(3))
        obj = ck.TrainingObjects({{"p": p}}, torch.optim.SGD([p], lr=0.1))
        write = lambda path: path.write_bytes(b"lora")
        ck.save_checkpoint({str(tmp_path)!r}, "toy", 1, write, obj)
        real = os.replace
        def dying_replace(src, dst):
            if os.path.basename(dst).startswith("state-"):
                os._exit(9)
            real(src, dst)
        ck.os.replace = dying_replace
        ck.save_checkpoint({str(tmp_path)!r}, "toy", 2, write, obj)
        """
    )
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(leftovers) == 1 and ".state-step000002.tmp-" in leftovers[0]
    latest = find_latest_checkpoint(tmp_path, "toy")
    assert latest.step == 1 and [c.step for c in list_checkpoints(tmp_path, "toy")] == [1, 2]
    p = torch.nn.Parameter(torch.zeros(3))
    assert (
        load_training_state(latest.state, TrainingObjects({"p": p}, torch.optim.SGD([p], lr=0.1))).step == 1
    )
    assert torch.equal(p.detach(), torch.ones(3))
    assert clean_stale_temps(tmp_path) == [tmp_path / leftovers[0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_stream_is_restored(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(4)
    torch.rand(1, device="cuda")  # initialises CUDA so its state is saved
    obj = TrainingObjects(params={}, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    save_training_state(tmp_path / "s", obj, step=0)
    first = torch.rand(4, device="cuda").cpu()
    torch.cuda.manual_seed_all(99)
    load_training_state(tmp_path / "s", obj)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), first)

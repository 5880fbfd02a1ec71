"""Bad input met by a real process: files it may not read or write, and a second Ctrl+C during the save.

Permission errors run in a subprocess that cannot bypass file modes (root without CAP_DAC_OVERRIDE) and
must say "permission denied", not "no such file". A real `python -m trainer train` is interrupted twice
with SIGINT during its save and must exit 130 without an abort, leaving every LoRA file it wrote whole.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from _bad_inputs_world import (
    REPO,
    assert_refused,
    fill,
    write_config,
)
from _bad_inputs_world import world as world  # a fixture (module-scoped here)

from trainer.lora.formats import read_lora
from trainer.tiny import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


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

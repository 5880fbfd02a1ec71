"""Progress on the command line (a tqdm bar on a terminal, plain lines in a pipe), TensorBoard logging and the
charts of loss.png: real training runs of the tiny model through `python -m trainer train`."""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer.cli import main
from trainer.config import config_from_dict, config_to_toml
from trainer.job import DONE, STOPPED, JobEvent
from trainer.plots import Axes, Smoother, loss_curve_png, nice_ticks, smooth, tick_label
from trainer.progress import ProgressPrinter, duration, rate
from trainer.tensorboard_log import MISSING, TensorBoardLogger, tensorboard_installed

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 25, 10
PLAIN = re.compile(r"^step (\d+)/(\d+) \((\d+)%\) loss (\d+\.\d{4}) smoothed (\d+\.\d{4}) lr (\S+) "
                   r"(\d+\.\d+ it/s|\d+\.\d\d s/it) eta (\?|\d+s|\d+m\d\ds|\d+h\d\dm)( mem \d+\.\d GiB)?$")
needs_tensorboard = pytest.mark.skipif(not tensorboard_installed(),
                                       reason="needs the tensorboard package (pip install tensorboard)")


def run_config(tmp_path: Path, **log) -> Path:
    """A 25-step sft run of the tiny model on four 64 px images: checkpoints every 10 steps, one preview
    prompt before and after, turbo health every 10 steps; written as TOML."""
    data = tmp_path / "images"
    data.mkdir()
    for i, colour in enumerate([(200, 40, 40), (40, 160, 60), (50, 80, 200), (220, 200, 60)]):
        image = Image.new("RGB", (64, 64), colour)
        ImageDraw.Draw(image).rectangle((8 + 4 * i, 8, 40, 40 + 4 * i), fill=(250, 250, 250))
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a white box on colour {i}")
    cfg = config_from_dict({
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(data), "resolutions": [64], "min_side": 32},
        "lora": {"rank": 4, "alpha": 4.0},
        "optim": {"lr": 1e-3, "steps": STEPS, "scheduler": "cosine", "warmup_steps": 5},
        "save": {"output_dir": str(tmp_path / "out"), "name": "run", "every": SAVE_EVERY},
        "preview": {"every": STEPS, "prompts": ["a white box"], "width": 64, "height": 64,
                    "health_every": 10, "health_size": 32},
        "log": log,
    })
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg, comments=False))
    return path


def cli(config: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "trainer", "train", "--config", str(config)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, **popen)


def progress_steps(lines: list[str]) -> list[int]:
    return [int(m[1]) for m in map(PLAIN.match, lines) if m]


# ---- a pipe: plain lines ---------------------------------------------------------------------------------


def test_a_pipe_gets_plain_lines_and_every_checkpoint_on_its_own_line(tmp_path):
    proc = cli(run_config(tmp_path), stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    text = err.decode()
    assert "\r" not in text and "\x1b" not in text  # nothing redraws: a log file reads line by line
    lines = text.splitlines()
    # the first step, every 10th and the last (and one more only if 10 s passed without a line: the tiny
    # model takes far less, unless the machine stalls)
    printed = progress_steps(lines)
    assert {1, 10, 20, 25} <= set(printed) and len(printed) <= 6 and printed == sorted(printed)
    first = PLAIN.match(next(line for line in lines if line.startswith("step 1/")))
    assert first[4] == first[5]  # the debiased average of one value is that value
    for step in (10, 20):
        at = lines.index(next(line for line in lines if line.startswith("checkpoint: ")
                              and line.endswith(f"-step{step:06d}.safetensors")))
        assert lines[at - 1].startswith(f"step {step}/{STEPS} ")
        assert Path(lines[at].split(": ", 1)[1]).is_file()
    assert sum(line.startswith("turbo health ") for line in lines) == 2  # steps 10 and 20
    assert [Path(line.split(": ", 1)[1]).name for line in lines if line.startswith("preview: ")] == \
        ["step000000.png", f"step{STEPS:06d}.png"]
    assert "loss.png" in out.decode()


# ---- a terminal: the bar, with every other line above it -------------------------------------------------


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: carriage returns, newlines, cursor-up and erase-line applied."""
    rows, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[(\d*)([A-Za-z])|(\r\n|\r|\n)|([^\x1b\r\n]+)", raw):
        n, code, control, text = token
        if code == "A":
            row = max(0, row - int(n or 1))
        elif code == "K":
            rows[row] = rows[row][:col]
        elif control in ("\r\n", "\n"):
            row, col = row + 1, 0
            rows.extend([""] * (row + 1 - len(rows)))
        elif control == "\r":
            col = 0
        elif text:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + text + line[col + len(text):]
            col += len(text)
    return [r.rstrip() for r in rows]


def test_a_terminal_gets_a_bar_that_no_line_overwrites(tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = cli(run_config(tmp_path), stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError as exc:  # Linux: EIO once the child has closed the terminal
            assert exc.errno == errno.EIO
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out, _ = proc.communicate(timeout=300)
    raw = b"".join(chunks).decode()
    assert proc.returncode == 0, raw
    assert raw.count("\r") > STEPS // 5  # the bar is redrawn in place
    shown = [line for line in screen(raw) if line]
    assert not any(PLAIN.match(line) for line in shown)  # no plain progress lines on a terminal
    bars = [line for line in shown if line.startswith("training:")]
    assert len(bars) == 1, shown  # each line printed during training took the bar's row, the bar moved down
    assert "100%" in bars[-1] and f"{STEPS}/{STEPS}" in bars[-1] and "loss " in bars[-1]
    # every message line is whole: nothing of the bar is left on it and the bar does not cover it
    checkpoints = [line for line in shown if line.startswith("checkpoint: ")]
    assert [Path(line.split(": ", 1)[1]).name for line in checkpoints] == \
        [f"run-step{step:06d}.safetensors" for step in (10, 20, STEPS)]  # the path, and nothing after it
    assert all(Path(line.split(": ", 1)[1]).is_file() for line in checkpoints[:2])
    health = [line for line in shown if line.startswith("turbo health ")]
    assert len(health) == 2 and all(line.endswith(")") for line in health)
    # the bar stayed below every line of the training and was left at 100% when it ended
    last_preview = f"preview: {tmp_path / 'out' / 'run' / 'previews'}/step{STEPS:06d}.png"
    assert shown.index(health[-1]) < shown.index(bars[-1]) < shown.index(last_preview)
    assert any(line.startswith("caching latents:") and "4/4" in line for line in shown)
    assert "loss.png" in out.decode()


# ---- the printer's rules, event by event -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def progress(step: int, steps: int = 100, loss: float = 0.5) -> JobEvent:
    return JobEvent("j", "progress", {"step": step, "steps": steps, "loss": loss, "lr": 1e-4, "it_s": 0.5,
                                      "eta_s": (steps - step) * 2.0, "mem_gb": 11.25})


def test_plain_lines_every_n_steps_or_seconds_and_the_step_a_stopped_run_reached(tmp_path):
    clock, path = Clock(), tmp_path / "log.txt"
    with path.open("w") as stream:
        printer = ProgressPrinter(stream, every_steps=10, every_s=30, clock=clock)
        assert not printer.tty
        for step in range(1, 38):
            clock.now = step * 2.0  # 2 s a step: every 10th step comes before 30 s have passed
            printer(progress(step, loss=1.0 / step))
        printer(JobEvent("j", "log", {"message": "stopping"}))
        printer(JobEvent("j", "status", {"status": STOPPED}))
    lines = path.read_text().splitlines()
    assert progress_steps(lines) == [1, 10, 20, 30, 37]
    assert lines[-2] == "stopping" and lines[-1].startswith("step 37/100 (37%)")
    assert lines[-1].endswith("2.00 s/it eta 2m06s mem 11.2 GiB")
    expected = smooth([1.0 / s for s in range(1, 38)])
    assert PLAIN.match(lines[-1])[5] == f"{expected[-1]:.4f}"

    slow, path = Clock(), tmp_path / "slow.txt"
    with path.open("w") as stream:
        printer = ProgressPrinter(stream, every_steps=10, every_s=30, clock=slow)
        for step in range(1, 12):
            slow.now = step * 20.0  # 20 s a step: a line at least every 30 s
            printer(progress(step))
        printer(JobEvent("j", "status", {"status": DONE}))
    assert progress_steps(path.read_text().splitlines()) == [1, 3, 5, 7, 9, 10, 11]


def test_durations_and_rates_read_like_people_write_them():
    assert [duration(s) for s in (0, 42.4, 185, 7440, float("inf"))] == ["0s", "42s", "3m05s", "2h04m", "?"]
    assert [rate(r) for r in (36.84, 1.0, 0.5, 0.0)] == ["36.8 it/s", "1.0 it/s", "2.00 s/it", "? it/s"]


# ---- TensorBoard -----------------------------------------------------------------------------------------


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    if "previews" in acc.Tags()["images"]:
        out["previews"] = [(e.step, (e.width, e.height)) for e in acc.Images("previews")]
    return out


@needs_tensorboard
def test_tensorboard_records_the_run(tmp_path, capsys):
    config = run_config(tmp_path, tensorboard=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's matrices gain nothing from more (as in the subprocesses)
    try:
        assert main(["train", "--config", str(config)]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    run = tmp_path / "out" / "run"
    assert f"TensorBoard: tensorboard --logdir {run / 'tensorboard'}" in captured.out
    logged = scalars(run / "tensorboard")
    losses = logged["loss/step"]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    # the same numbers as the printed lines, and the smoothed curve is loss.png's EMA of them
    matches = [m for m in map(PLAIN.match, captured.err.splitlines()) if m]
    printed = {int(m[1]): (float(m[4]), float(m[6])) for m in matches}
    assert {1, 10, 20, 25} <= set(printed) and len(printed) <= 6
    lr_at = dict(logged["train/lr"])
    for step, (loss, lr) in printed.items():
        assert abs(dict(losses)[step] - loss) < 6e-5 and lr_at[step] == pytest.approx(lr, rel=6e-3, abs=1e-12)
    np.testing.assert_allclose([v for _, v in logged["loss/smoothed"]], smooth([v for _, v in losses]),
                               rtol=1e-5)
    lr = [v for _, v in logged["train/lr"]]
    peak = lr.index(max(lr))  # linear warmup to optim.lr, then the cosine down to 0
    assert 3 <= peak <= 5 and lr[peak] == pytest.approx(1e-3) and lr[-1] < 1e-5
    steps = np.diff(lr)
    assert (steps[:peak] > 0).all() and (steps[peak:] <= 0).all()
    assert [s for s, _ in logged["speed/it_per_s"]][-1] == STEPS and "memory/peak_gb" not in logged  # CPU
    assert [s for s, _ in logged["turbo/health"]] == [10, 20]
    assert all(v > 0 for _, v in logged["turbo/health"])
    with Image.open(run / "previews" / "step000000.png") as first:
        assert logged["previews"] == [(0, first.size), (STEPS, first.size)]


@needs_tensorboard
def test_a_resumed_run_replaces_what_was_logged_after_its_checkpoint(tmp_path):
    first = TensorBoardLogger(tmp_path)
    for step in range(1, 31):  # an interrupted run: its last checkpoint was step 20
        first(progress(step, loss=1.0))
    first.close()
    second = TensorBoardLogger(tmp_path)
    for step in range(21, 41):
        second(progress(step, loss=2.0))
    second(JobEvent("j", "status", {"status": DONE}))
    assert second.closed
    losses = scalars(tmp_path)["loss/step"]
    assert losses == [(s, 1.0) for s in range(1, 21)] + [(s, 2.0) for s in range(21, 41)]


@needs_tensorboard
def test_tensorboard_listens_to_its_own_job_only(tmp_path):
    logger = TensorBoardLogger(tmp_path, job_id="mine")
    logger(JobEvent("other", "progress", progress(1).data))
    logger(JobEvent("mine", "progress", progress(2).data))
    logger.close()
    assert [s for s, _ in scalars(tmp_path)["loss/step"]] == [2]


def test_tensorboard_missing_is_refused_before_anything_loads(tmp_path):
    """Without the package (hidden from this process) the run ends with one line before the model or the
    dataset is touched: diffusers and the training loop are not even imported."""
    config = run_config(tmp_path, tensorboard=True)
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from trainer.cli import main\n"
            f"code = main(['train', '--config', {str(config)!r}])\n"
            "print(code, *(name in sys.modules for name in ('diffusers', 'trainer.loop')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert done.stderr == f"error: {MISSING}\n"
    assert not (tmp_path / "out").exists()  # no run or cache folder


# ---- the charts ------------------------------------------------------------------------------------------


def test_round_ticks_and_the_streaming_average():
    assert nice_ticks(0, 1200, 8) == [0, 200, 400, 600, 800, 1000, 1200]
    assert nice_ticks(0.013, 0.652, 6) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert nice_ticks(501, 800, 8) == [550, 600, 650, 700, 750, 800]
    assert nice_ticks(3, 3) == [3]
    ticks = nice_ticks(1.72, 2.31, 6)
    assert [tick_label(t, ticks[1] - ticks[0]) for t in ticks] == ["1.8", "1.9", "2.0", "2.1", "2.2", "2.3"]
    assert [tick_label(t, 0.25) for t in (0.25, 0.5)] == ["0.25", "0.50"]
    values = [0.9, 0.1, 0.5, 0.7]
    stream = Smoother()
    assert [stream(v) for v in values] == smooth(values)
    assert smooth(values)[1] == pytest.approx((0.09 * 0.9 + 0.1 * 0.1) / (1 - 0.81))


def dark_blue_rows(image: Image.Image, box: Axes) -> dict[int, float]:
    """Per pixel column of the plot area, the mean row of the smoothed curve's colour."""
    a = np.asarray(image).astype(int)
    mask = (np.abs(a - np.array([20, 60, 160])).sum(-1) < 30)
    return {x: float(np.nonzero(mask[box.top:box.bottom, x])[0].mean()) + box.top
            for x in range(box.left + 2, box.right - 1) if mask[box.top:box.bottom, x].any()}


def test_the_loss_chart_draws_the_smoothed_curve_where_its_axes_say(tmp_path):
    rng = np.random.default_rng(0)
    losses = list(0.5 + 0.3 * np.exp(-np.arange(300) / 80) + rng.normal(0, 0.02, 300))
    losses[40] = 25.0  # one spike must not flatten the curve: the axis keeps to the bulk of the values
    image = loss_curve_png(losses, tmp_path / "loss.png", size=(820, 380), first_step=501)
    assert image.size == (820, 380) and (tmp_path / "loss.png").is_file()
    rows = dark_blue_rows(image, Axes(86, 52, 820 - 24, 380 - 56, 0, 1, 0, 1))
    left, right = min(rows), max(rows)
    assert right - left > 650  # the curve runs across the plot
    # it falls by most of the plot's height (0.8 -> 0.5 with the spike cut off the axis)
    assert rows[right] - rows[left] > 0.5 * (380 - 56 - 52)

    health = [(500, 1.0), (600, 1.4), (700, 2.6), (800, 3.0)]
    both = loss_curve_png(losses, tmp_path / "both.png", health=health, threshold=2.0, scale="1 = base")
    a = np.asarray(both).astype(int)
    red = (np.abs(a - np.array([200, 40, 40])).sum(-1) < 30).nonzero()[0]
    green = (np.abs(a - np.array([30, 120, 60])).sum(-1) < 30).nonzero()[0]
    assert both.size == (820, 760) and red.min() > 380 and green.min() > 380  # the chart below

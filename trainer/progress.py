"""The command line's view of a job's events: a tqdm bar on a terminal, plain lines in a log file or pipe.

On a terminal, training (and cache encoding) show as tqdm bars and every other line (log, checkpoint,
preview, turbo health) is printed above the bar with `tqdm.write`, so nothing is ever drawn over it. When
the stream is not a terminal there is no `\\r` at all: one progress line every `every_steps` steps or
`every_s` seconds, always the first and the last step, each on its own line.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from .job import FINISHED, JobEvent
from .plots import Smoother

if TYPE_CHECKING:
    from .config_fields import TrainConfig
    from .job import JobRunner

CACHE_STAGES = {"latents": "caching latents", "text": "caching text embeddings",
                "trajectories": "sampling teacher trajectories"}


def duration(seconds: float) -> str:
    """A short human duration: 42s, 3m05s, 2h04m; '?' when unknown (infinite or NaN)."""
    if not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate(it_s: float) -> str:
    """Training speed as people read it: 36.8 it/s, or 2.05 s/it below one step a second."""
    if it_s <= 0 or not math.isfinite(it_s):
        return "? it/s"
    return f"{it_s:.1f} it/s" if it_s >= 1 else f"{1 / it_s:.2f} s/it"


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class ProgressPrinter:
    """Listener that shows a job's progress on `stream` (default stderr): a tqdm bar when it is a terminal
    (`tty` overrides the check), else plain lines; log, checkpoint, preview and health lines never
    overwrite the bar."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, every_steps: int = 10,
                 every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.every_steps, self.every_s, self.clock = every_steps, every_s, clock
        self._smoother = Smoother()
        self._bar: Any = None  # tqdm bars on a terminal
        self._cache_bar: Any = None
        self._cache_stage: str | None = None
        self._printed_at: dict[str, float] = {}  # plain mode: when each kind of line was last printed
        self._pending: str | None = None  # plain mode: the latest progress line not printed yet

    # ---- output -----------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """Print one line (above the bars on a terminal)."""
        if self._bar is not None or self._cache_bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _due(self, kind: str, forced: bool) -> bool:
        """Plain mode: whether a `kind` line should be printed now (forced, or every_s since the last)."""
        now = self.clock()
        last = self._printed_at.get(kind)
        if forced or last is None or now - last >= self.every_s:
            self._printed_at[kind] = now
            return True
        return False

    # ---- events -----------------------------------------------------------------------------------

    def __call__(self, event: JobEvent) -> None:
        d = event.data
        if event.kind == "progress":
            self._progress(d)
        elif event.kind == "cache":
            self._cache(d["stage"], d["done"], d["total"])
        elif event.kind == "health":
            self.line(f"turbo health {d['health']:.3f} at step {d['step']} "
                      f"({d.get('scale') or '1 = as the base'}; warning above {d['threshold']:g})")
        elif event.kind in ("checkpoint", "preview"):
            self.line(f"{event.kind}: {d['path']}")  # the file name says the step
        elif event.kind == "log":
            self.line(d.get("message", ""))
        elif event.kind == "status" and d.get("status") in FINISHED:
            self.close()

    def _progress(self, d: dict[str, Any]) -> None:
        step, steps = d["step"], d["steps"]
        smoothed = self._smoother(d["loss"])
        mem = f" mem {d['mem_gb']:.1f} GiB" if d.get("mem_gb") else ""
        if self.tty:
            self._close_cache()
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=steps, initial=step - 1, file=self.stream, unit="step",
                                 dynamic_ncols=True, desc="training")
            self._bar.set_postfix_str(f"loss {d['loss']:.4f} smooth {smoothed:.4f} lr {d['lr']:.2e}{mem}",
                                      refresh=False)
            self._bar.update(step - self._bar.n)
            if step >= steps:
                self.close()
            return
        text = (f"step {step}/{steps} ({100 * step // steps}%) loss {d['loss']:.4f} smoothed {smoothed:.4f} "
                f"lr {d['lr']:.2e} {rate(d['it_s'])} eta {duration(d['eta_s'])}{mem}")
        if self._due("progress", forced=step % self.every_steps == 0 or step >= steps):
            self._pending = None
            self.line(text)
        else:
            self._pending = text

    def _cache(self, stage: str, done: int, total: int) -> None:
        label = CACHE_STAGES.get(stage, f"cache {stage}")
        if self.tty:
            if self._cache_bar is None or self._cache_stage != stage:
                from tqdm import tqdm

                self._close_cache()
                self._cache_bar = tqdm(total=total, file=self.stream, unit="item", dynamic_ncols=True,
                                       desc=label)
                self._cache_stage = stage
            self._cache_bar.update(done - self._cache_bar.n)
            if done >= total:
                self._close_cache()
        elif self._due(f"cache {stage}", forced=done >= total):
            self.line(f"{label}: {done}/{total}")

    def _close_cache(self) -> None:
        if self._cache_bar is not None:
            self._cache_bar.close()
            self._cache_bar, self._cache_stage = None, None

    def close(self) -> None:
        """Finish the bars (a job's end does this); plain mode prints the last progress line if it was
        skipped, so a stopped run shows the step it stopped at."""
        self._close_cache()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._pending is not None:
            text, self._pending = self._pending, None
            self.line(text)


def attach_listeners(runner: JobRunner, cfg: TrainConfig, stream: TextIO | None = None) -> ProgressPrinter:
    """Subscribe the command line's listeners to `runner`: the progress printer on `stream` (stderr) and,
    with log.tensorboard, the TensorBoard writer in <run>/tensorboard (TensorBoardError when missing).
    Returns the printer: other lines printed during the run should go through its `line()`."""
    printer = ProgressPrinter(stream)
    listeners: list[Callable[[JobEvent], None]] = [printer]
    if cfg.log.tensorboard:
        from .tensorboard_log import TensorBoardLogger, check_tensorboard, tensorboard_dir

        check_tensorboard(cfg)
        listeners.append(TensorBoardLogger(tensorboard_dir(cfg)))
    for listener in listeners:
        runner.subscribe(listener)
    return printer

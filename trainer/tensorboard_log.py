"""TensorBoard logging of a training job (`log.tensorboard`): a job-event listener writing event files.

Scalars per optimizer step: `loss/step`, `loss/smoothed` (the debiased EMA of loss.png), `train/lr`,
`speed/it_per_s`, `memory/peak_gb` (CUDA runs); at each measurement `turbo/health` and
`turbo/health_warning`; every preview grid as the image `previews`. The writer opens at the first event
it records, with that event's step as TensorBoard's purge step, so a resumed run hides what an interrupted
one logged after its last checkpoint. Only process 0 emits events, so only it writes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ZitError
from .job import FINISHED, JobEvent
from .plots import Smoother

if TYPE_CHECKING:
    from .config_fields import TrainConfig

MISSING = "log.tensorboard = true needs the tensorboard package: pip install tensorboard"
FOLDER = "tensorboard"


class TensorBoardError(ZitError):
    """log.tensorboard is on but TensorBoard cannot be used here."""


def tensorboard_installed() -> bool:
    """Whether the tensorboard package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        return False


def check_tensorboard(cfg: TrainConfig) -> None:
    """Refuse a config with log.tensorboard on when the package is missing (before anything loads)."""
    if cfg.log.tensorboard and not tensorboard_installed():
        raise TensorBoardError(MISSING)


def tensorboard_dir(cfg: TrainConfig) -> Path:
    """Where a run's event files go: <save.output_dir>/<save.name>/tensorboard."""
    return Path(cfg.run_dir) / FOLDER


class TensorBoardLogger:
    """Job-event listener that writes a run's scalars and previews for TensorBoard under `log_dir`;
    with `job_id` it records only that job (a runner shared by several jobs)."""

    def __init__(self, log_dir: str | Path, job_id: str | None = None, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardError(f"{MISSING} ({exc})") from None
        self._writer_class, self.log_dir, self.job_id = SummaryWriter, Path(log_dir), job_id
        self.flush_secs = flush_secs
        self._writer = None
        self._smoother = Smoother()
        self.closed = False

    def _open(self, step: int):
        if self._writer is None:
            self._writer = self._writer_class(str(self.log_dir), purge_step=step, flush_secs=self.flush_secs)
        return self._writer

    def __call__(self, event: JobEvent) -> None:
        if self.closed or (self.job_id is not None and event.job_id != self.job_id):
            return
        d = event.data
        if event.kind == "progress":
            w, step = self._open(d["step"]), d["step"]
            w.add_scalar("loss/step", d["loss"], step)
            w.add_scalar("loss/smoothed", self._smoother(d["loss"]), step)
            w.add_scalar("train/lr", d["lr"], step)
            if d.get("it_s"):
                w.add_scalar("speed/it_per_s", d["it_s"], step)
            if d.get("mem_gb"):
                w.add_scalar("memory/peak_gb", d["mem_gb"], step)
        elif event.kind == "health":
            w = self._open(d["step"])
            w.add_scalar("turbo/health", d["health"], d["step"])
            w.add_scalar("turbo/health_warning", d["threshold"], d["step"])
        elif event.kind == "preview":
            import numpy as np
            from PIL import Image

            with Image.open(d["path"]) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._open(d["step"]).add_image("previews", pixels, d["step"], dataformats="HWC")
        elif event.kind == "status" and d.get("status") in FINISHED:
            self.close()

    def close(self) -> None:
        """Write everything out and close the event file (the job's end does this)."""
        self.closed = True
        if self._writer is not None:
            self._writer.close()

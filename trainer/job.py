"""Background jobs: run a piece of work on a thread with start / stop / status / events.

The ComfyUI node and the CLI are two front ends of the same runner: the work calls `ctx.emit(...)` and
polls `ctx.stop_requested`; listeners (a progress bar, ComfyUI's `send_sync`) receive every event.
"""

from __future__ import annotations

import errno
import gc
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ZitError

log = logging.getLogger(__name__)

RUNNING, STOPPING, DONE, STOPPED, FAILED = "running", "stopping", "done", "stopped", "failed"
FINISHED = (DONE, STOPPED, FAILED)


@dataclass
class JobEvent:
    """One thing a job reports: its kind ('progress', 'preview', 'checkpoint', 'log', 'status') and data."""

    job_id: str
    kind: str
    data: dict[str, Any]
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job_id, "kind": self.kind, "time": self.time, **self.data}


Listener = Callable[[JobEvent], None]


class JobContext:
    """What the work sees: a stop flag to poll and an emit function for events."""

    def __init__(self, job: Job):
        self._job = job

    @property
    def stop_requested(self) -> bool:
        return self._job._stop.is_set()

    def emit(self, kind: str, **data: Any) -> None:
        self._job._publish(kind, data)


class Job:
    """A unit of background work; its state is read through `snapshot()`."""

    def __init__(self, job_id: str, name: str, listeners: list[Listener], history: int = 2000):
        self.id = job_id
        self.name = name
        self.status = RUNNING
        self.error: str | None = None
        self.exception: BaseException | None = None  # what ended the job when it failed
        self.result: Any = None
        self.started = time.time()
        self.finished: float | None = None
        self.last: dict[str, dict[str, Any]] = {}  # latest data of each event kind
        self.events: deque[JobEvent] = deque(maxlen=history)
        self._listeners = listeners
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def stop(self) -> bool:
        """Ask the work to stop gracefully (it saves first); False when the job has already ended."""
        with self._lock:
            if self.status in FINISHED:
                return False
            self.status = STOPPING
        self._stop.set()
        self._publish("status", {"status": STOPPING})
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True when it did within `timeout`."""
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: id, name, status, error, times and the latest event of each kind."""
        with self._lock:
            return {"id": self.id, "name": self.name, "status": self.status, "error": self.error,
                    "started": self.started, "finished": self.finished,
                    "last": {k: dict(v) for k, v in self.last.items()}}

    def history(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Past events (bounded), optionally of one kind."""
        with self._lock:
            return [e.to_dict() for e in self.events if kind is None or e.kind == kind]

    def _publish(self, kind: str, data: dict[str, Any]) -> None:
        event = JobEvent(self.id, kind, data)
        with self._lock:
            self.events.append(event)
            self.last[kind] = data
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not kill the job
                log.exception("job %s: event listener failed", self.id)

    def _run(self, work: Callable[[JobContext], Any]) -> None:
        status, error = DONE, None
        try:
            self.result = work(JobContext(self))
            if self._stop.is_set():
                status = STOPPED
        except BaseException as exc:  # noqa: BLE001 - the thread must always end with a status
            status, error = FAILED, describe_failure(exc)
            self.exception = exc
            # the front end shows `error`; the traceback is for debug logs, never the terminal by default
            log.info("job %s failed: %s", self.id, error)
            log.debug("job %s failed:\n%s", self.id, traceback.format_exc())
        finally:
            free_memory()
        with self._lock:
            self.status, self.error, self.finished = status, error, time.time()
        self._publish("status", {"status": status, "error": error})
        self._done.set()


def describe_failure(exc: BaseException) -> str:
    """One line a user can act on, for the failures training meets: OOM, full disk, bad input, NaN."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return ("out of GPU memory: lower the resolution, the batch size or the rank, or turn gradient "
                "checkpointing on; the last checkpoint is intact")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = getattr(exc, "filename", "") or "a file"
        return f"disk full while writing {where}; the last checkpoint is intact"
    if isinstance(exc, ZitError):
        return str(exc)
    return f"{name}: {exc}"


def free_memory() -> None:
    """Drop the job's tensors and give cached GPU memory back."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


class JobRunner:
    """Starts jobs on daemon threads and keeps them addressable by id."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._listeners: list[Listener] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(event)` for every event of every job (from the job's thread)."""
        self._listeners.append(listener)

    def start(self, name: str, work: Callable[[JobContext], Any], job_id: str | None = None) -> Job:
        """Run `work(ctx)` on a new thread and return its Job at once."""
        with self._lock:
            job_id = job_id or f"{name}-{next(self._ids)}"
            if job_id in self._jobs and self._jobs[job_id].running:
                raise ZitError(f"job {job_id!r} is already running")
            job = Job(job_id, name, self._listeners)
            self._jobs[job_id] = job
        job._publish("status", {"status": RUNNING})
        job._thread = threading.Thread(target=job._run, args=(work,), name=f"zit-job-{job_id}", daemon=True)
        job._thread.start()
        return job

    def get(self, job_id: str) -> Job:
        """The job with this id; ZitError naming it when there is none."""
        try:
            return self._jobs[job_id]
        except KeyError:
            raise ZitError(f"no job {job_id!r}") from None

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

"""The pack's training jobs: one JobRunner for the ComfyUI process, the run each job trains, and the public
view of jobs and events that the /zit/ routes and `send_sync` give out.

The public view never holds a file-system path: previews are URLs under /zit/jobs/{id}/previews/, saved
LoRAs are file names and loras-folder names, and the folders ComfyUI knows (models, loras, output, input,
the ComfyUI folder, the home folder) are replaced by <loras>, <output>, ... in messages and errors.
Non-finite numbers (an ETA before the first step) become null, so the JSON is valid for browsers.

Imports trainer.job only (light); the checkpoint reader is imported when a route asks for checkpoints.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trainer.errors import ZitError
from ..trainer.job import FINISHED, Job, JobContext, JobEvent, JobRunner

log = logging.getLogger(__name__)
ROUTE = "/zit/jobs"
PREVIEW_RE = re.compile(r"^step(?P<step>\d{6,})\.png$")


class JobError(ZitError):
    """A request the jobs cannot serve; `status` is the HTTP status the routes answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Run:
    """A training run as the node started it: its folder, its LoRA's loras-folder name and how to start it.

    `work(resume)` gives the job's work function: False trains from scratch, True continues the latest
    saved state, a training-state folder (str) continues from that one.
    """

    name: str
    run_dir: Path
    lora_name: str
    steps: int
    work: Callable[[bool | str], Callable[[JobContext], Any]]


@dataclass
class Record:
    """A started job: its run and its loss / learning-rate series (every step, unlike the bounded history)."""

    run: Run
    loss: list[list[float]] = field(default_factory=list)
    lr: list[list[float]] = field(default_factory=list)
    health: list[list[float]] = field(default_factory=list)


RUNNER = JobRunner()
_RECORDS: dict[str, Record] = {}
_IDS = itertools.count(1)
_START = threading.Lock()


def _record_series(event: JobEvent) -> None:
    record = _RECORDS.get(event.job_id)
    if record is not None and event.kind == "progress":
        record.loss.append([event.data["step"], event.data["loss"]])
        record.lr.append([event.data["step"], event.data["lr"]])
    elif record is not None and event.kind == "health":
        record.health.append([event.data["step"], event.data["health"]])


def _log_event(event: JobEvent) -> None:
    """Status changes, log lines, the memory plan and saves in ComfyUI's console too."""
    data = event.data
    if event.kind == "status":
        log.info("ZIT training job %s: %s%s", event.job_id, data["status"],
                 f" ({data['error']})" if data.get("error") else "")
    elif event.kind == "log":
        log.info("ZIT training job %s: %s", event.job_id, data.get("message", ""))
    elif event.kind == "checkpoint":
        log.info("ZIT training job %s: saved step %s", event.job_id, data.get("step"))
    elif event.kind == "plan":
        log.info("ZIT training job %s: memory plan %s, predicted peak %.1f GiB%s", event.job_id,
                 data.get("plan"), data.get("predicted_gb", 0.0),
                 f" of {data['budget_gb']:.1f} GiB" if data.get("budget_gb") else "")


RUNNER.subscribe(_record_series)
RUNNER.subscribe(_log_event)


# ---- starting and finding jobs -------------------------------------------------------------------------


def active(job: Job) -> bool:
    """Whether a job is still training (its status; its thread may take a moment more to end)."""
    return job.status not in FINISHED


def running() -> list[Job]:
    """The training jobs still running (at most one: a second one is refused)."""
    return [job for job in RUNNER.jobs() if active(job) and job.id in _RECORDS]


def start(run: Run, resume: bool | str = False) -> Job:
    """Start a job training `run` (from scratch, or from a training-state folder); one job at a time."""
    with _START:
        busy = running()
        if busy:
            raise JobError(409, f"training job {busy[0].id} ({busy[0].name}) is still running: one job "
                                "trains at a time; stop it first (the ZIT panel, POST /zit/jobs/{id}/stop or "
                                "'ZIT Stop Training')")
        job_id = f"train-{next(_IDS)}"
        _RECORDS[job_id] = Record(run)
        try:
            return RUNNER.start(run.name, run.work(resume), job_id=job_id)
        except BaseException:
            del _RECORDS[job_id]
            raise


def get(job_id: str) -> tuple[Job, Record]:
    """The training job with this id and its record; JobError 404 naming it when there is none."""
    record = _RECORDS.get(job_id)
    if record is None:
        raise JobError(404, f"no training job {job_id!r}")
    return RUNNER.get(job_id), record


def jobs() -> list[tuple[Job, Record]]:
    """Every training job of this ComfyUI session, oldest first."""
    return [(job, _RECORDS[job.id]) for job in RUNNER.jobs() if job.id in _RECORDS]


def stop(job_id: str) -> Job:
    """Ask a job to stop (it saves a checkpoint first); JobError 409 when it has already finished."""
    job, _ = get(job_id)
    if not job.stop():
        raise JobError(409, f"training job {job_id} has already finished ({job.status})")
    return job


# ---- checkpoints and resuming --------------------------------------------------------------------------


def checkpoints(run: Run) -> list[Any]:
    """The run's saved steps that have a LoRA file (trainer.checkpoint.Checkpoint), oldest first."""
    from ..trainer.checkpoint import list_checkpoints

    return [c for c in list_checkpoints(run.run_dir, run.name) if c.lora is not None]


def _latest_state(run: Run) -> Any | None:
    """The run's last save (the engine's `latest`) when it holds a training state before the last step."""
    from ..trainer.checkpoint import find_latest_checkpoint

    latest = find_latest_checkpoint(run.run_dir, run.name)
    return latest if latest is not None and latest.state is not None and latest.step < run.steps else None


def resumable(job: Job, record: Record) -> bool:
    """Whether `resume` without a checkpoint can continue the job's run: it ended, and its last save holds a
    training state before the last step."""
    return not active(job) and _latest_state(record.run) is not None


def resume(job_id: str, checkpoint: str | None = None) -> Job:
    """A new job continuing the run of `job_id` from the named step file's training state, or from the run's
    last save."""
    job, record = get(job_id)
    if active(job):
        raise JobError(409, f"training job {job_id} is still running; stop it before resuming")
    run = record.run
    if checkpoint is None:
        chosen = _latest_state(run)
        if chosen is None:
            raise JobError(409, f"run {run.name!r} has no training state to continue: its last save is its "
                                f"last step ({run.steps}) or has no state; name an earlier checkpoint")
    else:
        found = {c.lora.name: c for c in checkpoints(run)}
        chosen = found.get(checkpoint)
        if chosen is None:
            names = ", ".join(found) or "none"
            raise JobError(400, f"{checkpoint!r} is not a checkpoint of run {run.name!r} "
                                f"(checkpoints: {names})")
        if chosen.state is None:
            raise JobError(400, f"{checkpoint} was saved without a training state (save.state = false): "
                                "it cannot be resumed")
        if chosen.step >= run.steps:
            raise JobError(400, f"{checkpoint} is the run's last step ({run.steps}): nothing left to train")
    return start(run, resume=str(chosen.state))


def previews(job: Job, run: Run) -> list[dict[str, Any]]:
    """The run's preview images, by step: {step, name, url}."""
    folder = run.run_dir / "previews"
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = PREVIEW_RE.match(entry.name)
            if match and entry.is_file():
                found.append({"step": int(match["step"]), "name": entry.name,
                              "url": preview_url(job.id, entry.name)})
    return sorted(found, key=lambda p: p["step"])


def preview_file(job_id: str, name: str) -> Path:
    """The file of a preview the job lists; JobError 404 for any other name (client text is never joined)."""
    job, record = get(job_id)
    for entry in previews(job, record.run):
        if entry["name"] == name:
            return record.run.run_dir / "previews" / entry["name"]
    raise JobError(404, f"training job {job_id} has no preview {name!r}")


def preview_url(job_id: str, name: str) -> str:
    return f"{ROUTE}/{job_id}/previews/{name}"


# ---- the public view -----------------------------------------------------------------------------------


def _roots() -> list[tuple[str, str]]:
    """(folder, label) of the folders ComfyUI knows, longest first."""
    roots: list[tuple[str, str]] = []
    try:
        import folder_paths

        roots += [(p, "<loras>") for p in folder_paths.get_folder_paths("loras")]
        roots += [(folder_paths.get_output_directory(), "<output>"),
                  (folder_paths.get_input_directory(), "<input>"),
                  (folder_paths.get_temp_directory(), "<temp>"),
                  (folder_paths.models_dir, "<models>"),
                  (folder_paths.base_path, "<comfyui>")]
    except ImportError:  # outside ComfyUI
        pass
    roots.append((os.path.expanduser("~"), "~"))
    found = []
    for path, label in roots:
        for form in {str(path), os.path.realpath(path)}:
            if len(form) > 1:
                found.append((form.rstrip(os.sep), label))
    return sorted(found, key=lambda r: -len(r[0]))


def scrub(text: str | None) -> str | None:
    """A message with the known folders replaced by labels (<loras>, <output>, <models>, ~, ...)."""
    if not text:
        return text
    for path, label in _roots():
        text = text.replace(path, label)
    return text


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def public_data(job_id: str, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event's data as clients see it: previews as URLs, checkpoints as names, messages scrubbed."""
    data = dict(data)
    if kind == "preview" and "path" in data:
        name = Path(data.pop("path")).name
        data.update(name=name, url=preview_url(job_id, name))
    elif kind == "checkpoint":
        data.pop("lora", None)
        if "path" in data:
            data["name"] = Path(data.pop("path")).name
    for key in ("message", "error"):
        if isinstance(data.get(key), str):
            data[key] = scrub(data[key])
    return _finite(data)


def public_event(event: JobEvent) -> dict[str, Any]:
    """The send_sync payload of an event: {"job": id, ...public data}."""
    return {"job": event.job_id, **public_data(event.job_id, event.kind, event.data)}


def snapshot(job: Job, record: Record) -> dict[str, Any]:
    """Job.snapshot() in public form, plus the loras-folder name of its LoRA and whether it can be resumed."""
    snap = job.snapshot()
    snap["error"] = scrub(snap["error"])
    snap["last"] = {kind: public_data(job.id, kind, data) for kind, data in snap["last"].items()}
    snap["lora_name"] = record.run.lora_name
    snap["resumable"] = resumable(job, record)
    return _finite(snap)


def details(job: Job, record: Record) -> dict[str, Any]:
    """GET /zit/jobs/{id}: the snapshot, the loss, lr and turbo-health series, the previews and the
    checkpoint names."""
    return _finite({
        "job": snapshot(job, record),
        "loss": [list(p) for p in record.loss],
        "lr": [list(p) for p in record.lr],
        "health": [list(p) for p in record.health],
        "previews": previews(job, record.run),
        "checkpoints": [c.lora.name for c in checkpoints(record.run)],
    })

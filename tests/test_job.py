"""The background job runner: events, graceful stop, failures with clear messages."""

import errno
import threading

import pytest

from trainer.errors import ZitError
from trainer.job import DONE, FAILED, STOPPED, JobRunner


def test_events_reach_listeners_and_snapshot():
    runner = JobRunner()
    seen = []
    runner.subscribe(lambda e: seen.append((e.kind, e.data)))

    def work(ctx):
        for step in range(3):
            ctx.emit("progress", step=step, loss=1.0 / (step + 1))
        return "ok"

    job = runner.start("train", work)
    assert job.wait(10)
    assert job.status == DONE and job.result == "ok"
    assert [d["step"] for k, d in seen if k == "progress"] == [0, 1, 2]
    snap = job.snapshot()
    assert snap["last"]["progress"]["step"] == 2 and snap["status"] == DONE
    assert len(job.history("progress")) == 3
    assert runner.get(job.id) is job


def test_stop_is_graceful():
    runner = JobRunner()
    started, saved = threading.Event(), []

    def work(ctx):
        started.set()
        while not ctx.stop_requested:
            ctx.emit("progress", step=1)
        saved.append("checkpoint")

    job = runner.start("train", work)
    started.wait(5)
    assert job.stop()
    assert job.wait(10)
    assert job.status == STOPPED and saved == ["checkpoint"]
    assert not job.stop()  # already ended


@pytest.mark.parametrize(
    "exc, words",
    [
        (ZitError("dataset folder 'x' is empty"), "dataset folder 'x' is empty"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/a.safetensors"), "disk full"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out of GPU memory"),
    ],
)
def test_failures_end_the_job_with_a_clear_message(exc, words):
    runner = JobRunner()

    def work(ctx):
        raise exc

    job = runner.start("train", work)
    assert job.wait(10)
    assert job.status == FAILED and words in job.error
    assert job.snapshot()["last"]["status"]["error"] == job.error


def test_broken_listener_does_not_kill_the_job_and_unknown_id_is_named():
    runner = JobRunner()
    runner.subscribe(lambda e: 1 / 0)
    job = runner.start("x", lambda ctx: ctx.emit("progress", step=1))
    assert job.wait(10) and job.status == DONE
    with pytest.raises(ZitError, match="no job 'nope'"):
        runner.get("nope")

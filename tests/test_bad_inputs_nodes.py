"""Bad input through the ComfyUI nodes and the /zit/jobs routes, checked without ComfyUI.

The cases call what the pack runs for them: the /zit/jobs request checks (nodes/jobs.py, nodes/routes.py,
imported as ComfyUI imports the pack) and the engine functions the nodes call. Each refusal is one line
(a JobError with its HTTP status, or a ZitError) and changes no file.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import threading
import types
from pathlib import Path

import pytest
from _bad_inputs_world import (
    BIG,
    REPO,
    fill,
    snapshot,
)
from _bad_inputs_world import world as world  # a fixture (module-scoped here)

from trainer.config import check_field
from trainer.errors import ZitError
from trainer.lora.any_file import read_any
from trainer.lora.blocks import resolve
from trainer.lora.formats import read_lora
from trainer.lora.spec import diffusers_name
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora
from trainer.tiny import TINY_SPEC

pytestmark = pytest.mark.usefixtures("one_thread")


PACK = "zit_pack_bad_inputs"


@pytest.fixture(scope="module")
def pack_nodes() -> types.SimpleNamespace:
    """nodes/jobs.py and nodes/routes.py imported the way ComfyUI imports the pack (as one package), without
    the node classes that need ComfyUI itself."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
        nodes = types.ModuleType(f"{PACK}.nodes")  # the package without its __init__ (which needs ComfyUI)
        nodes.__path__ = [str(REPO / "nodes")]
        sys.modules[nodes.__name__] = nodes
    return types.SimpleNamespace(jobs=importlib.import_module(f"{PACK}.nodes.jobs"),
                                 routes=importlib.import_module(f"{PACK}.nodes.routes"))


class Request:
    """The two things the /zit/jobs handlers read from an aiohttp request: the path's id and the body."""

    def __init__(self, job_id: str, body: bytes = b""):
        self.match_info, self._body = {"id": job_id}, body

    async def read(self) -> bytes:
        return self._body


def _run(pack_nodes, tmp_path: Path, release: threading.Event | None = None):
    """A finished (or, with `release`, running) job of a run in tmp_path with one saved LoRA and no state."""
    run_dir = tmp_path / "run"
    (run_dir / "previews").mkdir(parents=True)
    write_lora(random_lora(2, TINY_SPEC, seed=6), run_dir / "run-step000002.safetensors")
    (run_dir / "previews" / "step000002.png").write_bytes(b"png")

    def work(resume):
        return lambda ctx: release.wait(30) if release is not None else None

    run = pack_nodes.jobs.Run("run", run_dir, "run.safetensors", 10, work)
    job = pack_nodes.jobs.start(run)
    if release is None:
        assert job.wait(10)
    return job


ROUTE_CASES = {
    "unknown job": (lambda n, job: n.jobs.get("train-999"), 404, ["train-999"]),
    "stop a finished job": (lambda n, job: n.jobs.stop(job.id), 409, ["{job}", "already finished"]),
    "resume an unknown checkpoint": (lambda n, job: n.jobs.resume(job.id, "run-step000099.safetensors"), 400,
                                     ["run-step000099.safetensors", "not a checkpoint"]),
    "resume a checkpoint without a state": (
        lambda n, job: n.jobs.resume(job.id, "run-step000002.safetensors"), 400,
        ["run-step000002.safetensors", "without a training state"]),
    "resume a run without a state": (lambda n, job: n.jobs.resume(job.id), 409, ["no training state"]),
    "preview outside the run": (lambda n, job: n.jobs.preview_file(job.id, "../../run.toml"), 404,
                                ["../../run.toml"]),
    "body not JSON": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"{checkpoint"))), 400,
                      ["not JSON"]),
    "body not an object": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"[1]"))), 400,
                           ["JSON object"]),
    "body not UTF-8": (lambda n, job: asyncio.run(n.routes._body(Request(job.id, b"\xff\xfe"))), 400,
                       ["not JSON"]),
}


@pytest.mark.parametrize("call, status, words", list(ROUTE_CASES.values()), ids=list(ROUTE_CASES))
def test_route_refusal(pack_nodes, tmp_path, call, status, words):
    job = _run(pack_nodes, tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(pack_nodes.jobs.JobError) as caught:
        call(pack_nodes, job)
    message = str(caught.value)
    assert caught.value.status == status and "\n" not in message, message
    for word in fill(words, {"job": job.id}):
        assert word in message, (word, message)
    assert snapshot(tmp_path) == before


def test_a_second_training_job_is_refused_while_one_runs(pack_nodes, tmp_path):
    release = threading.Event()
    running = _run(pack_nodes, tmp_path / "a", release)
    try:
        with pytest.raises(pack_nodes.jobs.JobError) as caught:
            _run(pack_nodes, tmp_path / "b")
        assert caught.value.status == 409 and running.id in str(caught.value)
    finally:
        release.set()
        running.wait(10)


NODE_CASES = {
    # ZIT Train's advanced box: each key goes through check_field
    "advanced: unknown key": (lambda w: check_field("optim.learning_rate", 1e-3), ["optim.learning_rate"]),
    "advanced: bad value": (lambda w: check_field("lora.rank", -4), ["lora.rank = -4"]),
    # ZIT LoRA Loader / adapter attach: a LoRA for another model size, checked against the model's spec
    "LoRA for another model": (lambda w: read_any(w / "a.safetensors", spec=TINY_SPEC), ["a.safetensors"]),
    # the block-weight widget and the browser editor's resolve route
    "block weights text": (lambda w: resolve("L10-19=0.5,X3=1"), ["X3"]),
    # ZIT LoRA Merge & Save / Convert with dtype fp16
    "save as fp16 overflows": (
        lambda w: write_lora(read_lora(w / "big.safetensors"), w / "out_fp16.safetensors", dtype="fp16"),
        [diffusers_name(BIG), "fp16"]),
}


@pytest.mark.parametrize("call, words", list(NODE_CASES.values()), ids=list(NODE_CASES))
def test_node_refusal(world, call, words):
    before = snapshot(world)
    with pytest.raises(ZitError) as caught:
        call(world)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert snapshot(world) == before

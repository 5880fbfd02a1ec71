"""Host tests: the pack inside a real ComfyUI, started headless on the CPU, fed API prompts over HTTP.

ComfyUI is found through COMFYUI_PATH or as the ComfyUI folder this repo sits in
(ComfyUI/custom_nodes/<repo>); without one, every test that needs it is skipped with the reason. The server
runs with the Python running the tests (ComfyUI's venv) on a temporary --base-directory holding the tiny
Z-Image files of _tiny_models.py under the usual names, and the training dataset (input/zit_dataset: 3 images
with captions).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST_DIR = Path(__file__).resolve().parent
REPO = HOST_DIR.parents[1]
WORKFLOWS = REPO / "workflows"
sys.path.insert(0, str(HOST_DIR))
import _comfy_inproc as inproc  # noqa: E402
from _tiny_models import write_tiny_models  # noqa: E402

DATASET = "zit_dataset"  # input/ folder of the training workflows and tests: 3 images (256 px) with captions
LAUNCH = """\
import runpy, sys
sys.path.insert(0, {host!r})
import _comfy_inproc
_comfy_inproc._torchaudio_or_stand_in()  # torchaudio's wheel may not load on a CPU-only machine
sys.path.remove({host!r})
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""
START_TIMEOUT = 300.0
REQUIREMENTS = ("torch", "aiohttp", "safetensors", "comfyui_frontend_package")


REPORT: list[str] = []  # figures tests measured, printed in the terminal summary (also without -s)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.write_sep("-", "zit-trainer host measurements")
        for line in REPORT:
            terminalreporter.write_line(line)


# --------------------------------------------------------------------------------------------------
# UI-format (frontend) workflow -> API-format prompt
# --------------------------------------------------------------------------------------------------

VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})  # frontend-only: no backend class, nothing to run
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


def is_widget(spec: list) -> bool:
    """Whether an /object_info input spec is drawn as a widget (its value saved in widgets_values)."""
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def widget_names(info: dict) -> list[tuple[str, bool]]:
    """(name, has a control_after_generate value) of a node's widgets, in widgets_values order."""
    spec = info["input"]
    order = info.get("input_order", {})
    names = [*order.get("required", spec.get("required", {})),
             *order.get("optional", spec.get("optional", {}))]
    specs = {**spec.get("required", {}), **spec.get("optional", {})}
    return [(n, bool(specs[n][1].get("control_after_generate")) if len(specs[n]) > 1 else False)
            for n in names if is_widget(specs[n])]


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """The API-format prompt of a UI-format (version 0.4) workflow, using /object_info for widget order.

    widgets_values holds one value per widget input (required, then optional, in input_order; link-only
    inputs have none) plus, after a widget with control_after_generate (seeds), that control's value. An
    input with a link takes [source node id, output slot] instead of its widget value.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        kind, nid = node["type"], node["id"]
        if kind in VIRTUAL_NODES:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {nid} ({kind}) is muted or bypassed (mode {node['mode']}): not supported")
        if kind not in object_info:
            raise ValueError(f"node {nid}: unknown node type {kind!r} (not in /object_info)")
        values = node.get("widgets_values") or []
        if not isinstance(values, list):
            raise ValueError(f"node {nid} ({kind}): widgets_values is not a list")
        inputs: dict[str, Any] = {}
        at = 0
        for name, control in widget_names(object_info[kind]):
            if at >= len(values):
                raise ValueError(f"node {nid} ({kind}): widgets_values has {len(values)} values, too few for "
                                 f"the widgets {[n for n, _ in widget_names(object_info[kind])]}")
            inputs[name] = values[at]
            at += 2 if control else 1
        if at != len(values):
            raise ValueError(f"node {nid} ({kind}): widgets_values has {len(values)} values, the node's "
                             f"widgets take {at}")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------------------------------
# Finding ComfyUI; its base directory (the tiny files of _tiny_models.py, the dataset, the pack)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    """The ComfyUI checkout (skips the test when there is none, or this Python cannot run it)."""
    root = inproc.find_comfyui()
    if root is None:
        pytest.skip(inproc.skip_reason())
    missing = [m for m in REQUIREMENTS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"ComfyUI at {root}, but this Python ({sys.executable}) lacks {', '.join(missing)}: "
                    "run the host tests with ComfyUI's own environment")
    return root


@pytest.fixture(scope="session")
def base_dir(comfyui_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A ComfyUI --base-directory: tiny models (~4 GB, removed after the session) and the pack."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "zit-trainer").symlink_to(REPO, target_is_directory=True)
    inproc._torchaudio_or_stand_in()  # transformers imports torchaudio, whose wheel may not load here
    write_tiny_models(comfyui_root, base)
    from trainer.demo import make_dataset

    make_dataset(base / "input" / DATASET, n=3, size=256)
    yield base
    shutil.rmtree(base / "models", ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The server and its client
# --------------------------------------------------------------------------------------------------


class PromptError(AssertionError):
    """ComfyUI refused a prompt (validation) or a node failed while running it; the message says why."""


@dataclass
class ComfyClient:
    """HTTP client of the test server: queue API prompts, wait for their history, read the log."""

    url: str
    log_path: Path
    object_info: dict

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; (HTTP status, JSON body), including a 400's body with the node errors."""
        data = json.dumps({"prompt": prompt, "client_id": "zit-host-tests"}).encode()
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + "/prompt", data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float) -> dict:
        """The /history entry of a prompt once it finished (success or error)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise PromptError(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        """Queue a prompt, wait for it, return its outputs by node id; PromptError with ComfyUI's errors."""
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise PromptError(f"/prompt refused the prompt ({status}): {json.dumps(body, indent=1)}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            raise PromptError(f"the prompt failed: {json.dumps(errors, indent=1)}")
        return entry["outputs"]

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- ComfyUI log (last {chars} chars) ---\n{text[-chars:]}"


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> dict:
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {proc.returncode} while starting\n"
                               f"{log.read_text(errors='replace')[-8000:]}")
        try:
            with urllib.request.urlopen(url + "/object_info", timeout=30) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise RuntimeError(f"ComfyUI did not answer /object_info within {START_TIMEOUT:.0f} s\n"
                       f"{log.read_text(errors='replace')[-8000:]}")


def start_server(comfyui: Path, base: Path) -> tuple[subprocess.Popen, ComfyClient]:
    """ComfyUI (--cpu) on the base directory with the pack loaded: the process and its client."""
    port = _free_port()
    log = base / "comfyui.log"
    cmd = [sys.executable, "-c", LAUNCH.format(host=str(HOST_DIR)), "--cpu", "--base-directory", str(base),
           "--port", str(port), "--listen", "127.0.0.1", "--database-url", "sqlite:///:memory:"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=comfyui, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        return proc, ComfyClient(url, log, _wait_ready(url, proc, log))
    except BaseException:
        stop_server(proc)
        raise


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate a server, killing it if it does not end within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def comfy(comfyui_root: Path, base_dir: Path) -> Iterator[ComfyClient]:
    """A ComfyUI server (--cpu) on base_dir with the pack loaded; stopped after the session."""
    proc, client = start_server(comfyui_root, base_dir)
    try:
        yield client
    finally:
        stop_server(proc)

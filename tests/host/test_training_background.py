"""A training job in the background of a real headless ComfyUI (--cpu) on the tiny Z-Image files: ZIT Dataset
-> ZIT Train queued through /prompt with wait off, a second prompt finishing while the job trains, one job at
a time, the /zit/jobs routes and zit.* events, the LoRA in the loras folder, stop and resume (routes and the
ZIT Stop Training node), and bad route inputs answered with a 4xx and a message.

The job gets many steps and is stopped by the tests, so nothing depends on timing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from _training_helpers import LONG, Events, call, get, job, sample_prompt, train_prompt, until
from _training_helpers import events as events  # a fixture (module-scoped here)
from conftest import ComfyClient, PromptError


def step_of(details: dict) -> int:
    return (details["job"]["last"].get("progress") or {}).get("step", 0)


def job_when(comfy: ComfyClient, job_id: str, condition: Callable[[dict], bool]) -> Callable[[], dict | None]:
    """A check for `until`: the job's details once condition(details) holds, else None."""
    def check() -> dict | None:
        details = job(comfy, job_id)
        return details if condition(details) else None

    return check


def start_job(comfy: ComfyClient, prompt: dict) -> str:
    """Queue a ZIT Train prompt (wait off): it finishes at once and names the job it started."""
    outputs = comfy.run(prompt, timeout=600)
    text = outputs["t"]["text"][0]
    found = re.search(r"training job (train-\d+) started", text)
    assert found, text
    return found[1]


def stop_and_wait(comfy: ComfyClient, job_id: str) -> dict:
    status, body, _ = call(comfy, "POST", f"/zit/jobs/{job_id}/stop")
    assert status in (200, 409), body
    ended = job_when(comfy, job_id, lambda d: d["job"]["status"] in ("stopped", "done", "failed"))
    return until(ended, f"{job_id} to end", comfy=comfy)


def no_paths(text: str, base_dir: Path) -> None:
    for path in {str(base_dir), str(base_dir.resolve()), str(Path.home())}:
        assert path not in text, f"an absolute path ({path}) reached the client: {text[:2000]}"


@pytest.fixture(scope="module")
def background(comfy: ComfyClient, base_dir: Path) -> str:
    """A job trained in the background (run 'bg'), running when the module starts with it."""
    return start_job(comfy, train_prompt("bg"))


# --------------------------------------------------------------------------------------------------
# The job in the background
# --------------------------------------------------------------------------------------------------


def test_a_job_trains_in_the_background_beside_the_queue(comfy: ComfyClient, base_dir: Path, events: Events,
                                                          background: str):
    job_id, loras = background, base_dir / "models" / "loras" / "zit-trainer" / "bg"
    step2 = loras / "bg-step000002.safetensors"
    until(lambda: step2.is_file(), "the step-2 LoRA in the loras folder", comfy=comfy)
    details = job(comfy, job_id)
    assert details["job"]["status"] == "running"
    assert details["job"]["lora_name"] == "zit-trainer/bg/bg.safetensors"

    # A second prompt (core nodes, the step-2 LoRA through LoraLoaderModelOnly) completes while it trains.
    outputs = comfy.run(sample_prompt("zit-trainer/bg/bg-step000002.safetensors", seed=3), timeout=600)
    assert outputs["s"]["images"]
    assert job(comfy, job_id)["job"]["status"] == "running", "the job ended before the second prompt did"

    # One job at a time: a second training prompt is refused with a message, the first goes on.
    with pytest.raises(PromptError, match=f"training job {job_id} .*still running"):
        comfy.run(train_prompt("second"), timeout=600)
    assert not (base_dir / "models" / "loras" / "zit-trainer" / "second").exists()

    # The routes: progress, the loss and lr series, previews as URLs, checkpoint names; no paths.
    details = until(job_when(comfy, job_id, lambda d: step_of(d) >= 4), "step 4", comfy=comfy)
    progress = details["job"]["last"]["progress"]
    assert progress["steps"] == LONG and {"loss", "lr", "it_s", "eta_s", "mem_gb"} <= set(progress)
    assert [p[0] for p in details["loss"]][:4] == [1, 2, 3, 4] and len(details["lr"]) == len(details["loss"])
    names = [p["name"] for p in details["previews"]]
    assert names[:3] == ["step000000.png", "step000002.png", "step000004.png"], names
    status, png, kind = call(comfy, "GET", details["previews"][1]["url"])
    assert status == 200 and kind == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"bg-step000002.safetensors", "bg-step000004.safetensors"} <= set(details["checkpoints"])
    listed = {j["id"]: j for j in get(comfy, "/zit/jobs")["jobs"]}
    assert listed[job_id]["status"] == "running" and listed[job_id]["resumable"] is False
    no_paths(json.dumps(details) + json.dumps(listed), base_dir)

    # The events, through ComfyUI's websocket.
    until(lambda: events.of("checkpoint", job_id), "a zit.checkpoint event", comfy=comfy)
    assert [e["step"] for e in events.of("progress", job_id)][:2] == [1, 2]
    checkpoint = events.of("checkpoint", job_id)[0]
    assert checkpoint == {"job": job_id, "step": 2, "name": "bg-step000002.safetensors",
                          "lora_name": "zit-trainer/bg/bg-step000002.safetensors",
                          "final": "zit-trainer/bg/bg.safetensors"}
    preview = events.of("preview", job_id)[-1]
    assert preview["url"].startswith(f"/zit/jobs/{job_id}/previews/step") and "path" not in preview
    assert events.of("status", job_id) and events.of("log", job_id)
    no_paths(json.dumps(events.messages), base_dir)

    # Stop: the job saves, ends "stopped", and its final LoRA is in the loras folder for core loaders.
    status, body, _ = call(comfy, "POST", f"/zit/jobs/{job_id}/stop")
    assert status == 200 and body["ok"] is True and body["job"]["status"] in ("stopping", "stopped")
    ended = stop_and_wait(comfy, job_id)
    assert ended["job"]["status"] == "stopped" and ended["job"]["error"] is None and ended["job"]["resumable"]
    final = loras / "bg.safetensors"
    assert final.is_file() and not list(loras.glob("state*")) and not list(loras.glob("*.pt"))
    assert comfy.run(sample_prompt("zit-trainer/bg/bg.safetensors", seed=4), timeout=600)["s"]["images"]


def test_stop_and_resume_from_a_checkpoint(comfy: ComfyClient, base_dir: Path, events: Events,
                                           background: str):
    until(job_when(comfy, background, lambda d: step_of(d) >= 4 or d["job"]["status"] != "running"),
          "step 4", comfy=comfy)
    first = stop_and_wait(comfy, background)
    assert first["job"]["status"] == "stopped" and step_of(first) >= 4

    status, body, _ = call(comfy, "POST", f"/zit/jobs/{background}/stop")
    assert status == 409 and "already finished" in body["error"]

    status, body, _ = call(comfy, "POST", f"/zit/jobs/{background}/resume",
                           {"checkpoint": "bg-step000002.safetensors"})
    assert status == 200, body
    resumed = body["job"]["id"]
    assert resumed != background and body["job"]["lora_name"] == "zit-trainer/bg/bg.safetensors"
    status, body, _ = call(comfy, "POST", f"/zit/jobs/{resumed}/resume", {})
    assert status == 409 and "still running" in body["error"]
    status, body, _ = call(comfy, "POST", f"/zit/jobs/{background}/resume", {})
    assert status == 409 and "still running" in body["error"]  # one job at a time

    details = until(job_when(comfy, resumed, lambda d: step_of(d) >= 3), "the resumed job's step 3",
                    comfy=comfy)
    assert details["loss"][0][0] == 3, "the resumed job did not continue from step 2"
    assert any("resumed from state-step000002" in m.get("message", "") for m in events.of("log", resumed))
    # The 'ZIT Stop Training' node, queued on its own (never cached: a second one reports the job ended).
    stop_node = {"s": {"class_type": "ZITStopTraining", "inputs": {"job_id": resumed}}}
    assert comfy.run(stop_node)["s"]["text"] == [f"stop requested: {resumed} (bg)"]
    saved = step_of(stop_and_wait(comfy, resumed))  # a stop saves at the step reached
    assert comfy.run(stop_node)["s"]["text"] == [f"{resumed} had already ended (stopped)"]

    # No checkpoint named: the latest saved state.
    status, body, _ = call(comfy, "POST", f"/zit/jobs/{resumed}/resume")
    assert status == 200, body
    latest = body["job"]["id"]
    details = until(job_when(comfy, latest, lambda d: bool(d["loss"])), "the latest resume's first step",
                    comfy=comfy)
    assert details["loss"][0][0] == saved + 1
    assert stop_and_wait(comfy, latest)["job"]["status"] == "stopped"
    assert [j["id"] for j in get(comfy, "/api/zit/jobs")["jobs"]][-3:] == [background, resumed, latest]


def test_bad_route_inputs_get_a_4xx_with_a_message(comfy: ComfyClient, base_dir: Path, background: str):
    stop_and_wait(comfy, background)
    jid = background
    cases = [
        ("GET", "/zit/jobs/train-999", None, None, 404, "no training job 'train-999'"),
        ("POST", "/zit/jobs/nope/stop", None, None, 404, "no training job"),
        ("POST", "/zit/jobs/nope/resume", {}, None, 404, "no training job"),
        ("GET", "/zit/jobs/nope/previews/step000000.png", None, None, 404, "no training job"),
        ("GET", f"/zit/jobs/{jid}/previews/comfyui.log", None, None, 404, "no preview"),
        ("GET", f"/zit/jobs/{jid}/previews/..%2F..%2F..%2Fcomfyui.log", None, None, 404, None),
        ("GET", f"/zit/jobs/{jid}/previews/%2e%2e", None, None, 404, None),
        ("GET", f"/zit/jobs/{jid}/previews/step000002.png.bak", None, None, 404, "no preview"),
        ("POST", f"/zit/jobs/{jid}/resume", {"checkpoint": "../../../ae.safetensors"}, None, 400,
         "is not a checkpoint"),
        ("POST", f"/zit/jobs/{jid}/resume", {"checkpoint": "bg-step999999.safetensors"}, None, 400,
         "is not a checkpoint"),
        ("POST", f"/zit/jobs/{jid}/resume", {"checkpoint": 2}, None, 400, "must be a checkpoint file name"),
        ("POST", f"/zit/jobs/{jid}/resume", {"step": 2}, None, 400, "unknown field"),
        ("POST", f"/zit/jobs/{jid}/resume", [1], None, 400, "JSON object"),
        ("POST", f"/zit/jobs/{jid}/resume", None, b"{not json", 400, "not JSON"),
        ("POST", f"/zit/jobs/{jid}/stop", None, None, 409, "already finished"),
    ]
    for method, path, body, raw, want, words in cases:
        for prefix in ("", "/api"):
            status, answer, kind = call(comfy, method, prefix + path, body, raw)
            assert status == want, (prefix + path, status, answer)
            if words is not None:
                assert "json" in kind and words in answer["error"], (path, answer)


"""Training inside a real headless ComfyUI (--cpu) on the tiny Z-Image files: ZIT Dataset -> ZIT Train queued
through /prompt, the job in the background, the /zit/jobs routes and zit.* events, the LoRA in the loras
folder, a second prompt finishing while the job trains, stop and resume, wait with Cancel, and refusals.

The tiny transformer has the full width (dim 3840, 1 main layer): a bf16 step at 64 px takes about a second
on two CPU cores. Jobs get many steps and are stopped by the tests, so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIP, DATASET, LORAS, UNET, UNET_FP8, VAE, ComfyClient, PromptError

ADAPTER = "zimage_turbo_training_adapter_v2.safetensors"
assert ADAPTER in LORAS
SIDE = 64
ADVANCED = '[preview]\nwidth = 64\nheight = 64\nturbo_steps = 2\n\n[save]\nkeep_last = 0\n'
LONG = 100000  # steps: the tests stop the jobs


# --------------------------------------------------------------------------------------------------
# HTTP, events, prompts
# --------------------------------------------------------------------------------------------------


def call(comfy: ComfyClient, method: str, path: str, body: Any = None, raw: bytes | None = None
         ) -> tuple[int, Any, str]:
    """(status, parsed JSON or None, content type) of a request; error statuses are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(comfy.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, payload, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, (json.loads(payload) if "json" in kind else payload), kind


def get(comfy: ComfyClient, path: str) -> Any:
    status, body, _ = call(comfy, "GET", path)
    assert status == 200, (path, status, body)
    return body


def until(check: Callable[[], Any], what: str, timeout: float = 300.0,
          comfy: ComfyClient | None = None) -> Any:
    """Poll check() until it returns something truthy; fail naming `what` after timeout seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{comfy.log_tail() if comfy else ''}")


def job(comfy: ComfyClient, job_id: str) -> dict:
    return get(comfy, f"/zit/jobs/{job_id}")


def step_of(details: dict) -> int:
    return (details["job"]["last"].get("progress") or {}).get("step", 0)


def job_when(comfy: ComfyClient, job_id: str, condition: Callable[[dict], bool]) -> Callable[[], dict | None]:
    """A check for `until`: the job's details once condition(details) holds, else None."""
    def check() -> dict | None:
        details = job(comfy, job_id)
        return details if condition(details) else None

    return check


class Events:
    """zit.* messages from ComfyUI's websocket, collected on a thread."""

    def __init__(self, url: str):
        self.url = url.replace("http://", "ws://") + "/ws?clientId=zit-training-tests"
        self.messages: list[dict] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)
        self._thread.start()
        assert self.ready.wait(60), "websocket did not connect"

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
            self.ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if str(data.get("type", "")).startswith("zit."):
                        self.messages.append(data)
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def of(self, kind: str, job_id: str) -> list[dict]:
        return [m["data"] for m in list(self.messages)
                if m["type"] == f"zit.{kind}" and m["data"]["job"] == job_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def events(comfy: ComfyClient) -> Iterator[Events]:
    listener = Events(comfy.url)
    yield listener
    listener.close()


def train_prompt(name: str, steps: int = LONG, wait: bool = False, turbo: str = "adapter",
                 adapter: str = ADAPTER, advanced: str = ADVANCED, prompts: str = "a red circle",
                 model: list | None = None) -> dict:
    """Load the tiny files, encode the dataset at 64 px, train rank 4 (saves and previews every 2 steps)."""
    return {
        "u": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "c": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "lumina2"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "d": {"class_type": "ZITDataset", "inputs": {
            "folder": DATASET, "clip": ["c", 0], "vae": ["v", 0], "resolutions": str(SIDE), "trigger": "zqx",
            "caption": "", "missing_caption": "error", "caption_ext": ".txt", "recursive": False,
            "min_side": 256, "bad_image": "skip"}},
        "t": {"class_type": "ZITTrain", "inputs": {
            "model": model or ["u", 0], "dataset": ["d", 0], "name": name, "turbo": turbo, "adapter": adapter,
            "steps": steps, "learning_rate": 1e-3, "rank": 4, "optimizer": "adamw", "batch_size": 1,
            "gradient_checkpointing": True, "save_every": 2, "preview_prompts": prompts, "preview_every": 2,
            "seed": 7, "wait": wait, "resume": False, "advanced": advanced}},
    }


def sample_prompt(lora_name: str, seed: int) -> dict:
    """Core nodes only: the base plus a LoRA from the loras folder (LoraLoaderModelOnly), 2 steps at 64 px."""
    return {
        "u": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "l": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["u", 0], "lora_name": lora_name, "strength_model": 1.0}},
        "m": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["l", 0], "shift": 3.0}},
        "c": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "lumina2"}},
        "p": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["c", 0], "text": "zqx, a red circle"}},
        "n": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["p", 0]}},
        "e": {"class_type": "EmptySD3LatentImage",
              "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "res_multistep",
            "scheduler": "simple", "positive": ["p", 0], "negative": ["n", 0], "latent_image": ["e", 0],
            "denoise": 1.0}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "x": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["v", 0]}},
        "s": {"class_type": "SaveImage",
              "inputs": {"images": ["x", 0], "filename_prefix": "zit_during_training"}},
    }


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


# --------------------------------------------------------------------------------------------------
# wait, Cancel, refusals
# --------------------------------------------------------------------------------------------------


def test_wait_blocks_with_progress_and_cancel_stops_the_job_after_saving(comfy: ComfyClient, base_dir: Path):
    before = {j["id"] for j in get(comfy, "/zit/jobs")["jobs"]}
    status, body = comfy.post_prompt(train_prompt("waited", wait=True, prompts=""))
    assert status == 200, body

    def new_job_at_step_2() -> str | None:
        for j in get(comfy, "/zit/jobs")["jobs"]:
            if j["id"] not in before and (j["last"].get("progress") or {}).get("step", 0) >= 2:
                return j["id"]
        return None

    job_id = until(new_job_at_step_2, "the waited job's step 2", comfy=comfy)
    queue = get(comfy, "/queue")
    running = [item[1] for item in queue["queue_running"]]
    assert running == [body["prompt_id"]], "wait did not block the prompt"
    call(comfy, "POST", "/interrupt", {})
    entry = comfy.wait(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"]), entry["status"]
    ended = job(comfy, job_id)
    assert ended["job"]["status"] == "stopped", ended["job"]
    assert (base_dir / "models" / "loras" / "zit-trainer" / "waited" / "waited.safetensors").is_file()


def test_a_scaled_fp8_file_trains_in_the_fp8_plan(comfy: ComfyClient, base_dir: Path, events: Events):
    """ComfyUI's scaled-fp8 file through UNETLoader -> ZIT Train (memory fp8): the plan in the routes, the
    events and ComfyUI's log; the LoRA it saves applies to the bf16 model with core nodes."""
    prompt = train_prompt("fp8run", steps=2, wait=True, turbo="sft", prompts="")
    prompt["u"]["inputs"]["unet_name"] = UNET_FP8
    prompt["t"]["inputs"]["memory"] = "fp8"
    before = {j["id"] for j in get(comfy, "/zit/jobs")["jobs"]}
    comfy.run(prompt, timeout=900)
    (job_id,) = {j["id"] for j in get(comfy, "/zit/jobs")["jobs"]} - before
    details = job(comfy, job_id)
    assert details["job"]["status"] == "done", details["job"]
    plan = details["job"]["last"]["plan"]
    assert plan["plan"] == "fp8" and plan["storage"] == "fp8" and plan["predicted_gb"] > 0, plan
    assert events.of("plan", job_id) and events.of("plan", job_id)[-1]["plan"] == "fp8"
    assert f"ZIT training job {job_id}: memory plan fp8, predicted peak" in comfy.log_tail(200_000)
    lora = base_dir / "models" / "loras" / "zit-trainer" / "fp8run" / "fp8run.safetensors"
    assert lora.is_file()
    sampled = comfy.run(sample_prompt("zit-trainer/fp8run/fp8run.safetensors", seed=5), timeout=600)
    assert sampled["s"]["images"]


def test_distill_mode_trains_from_an_sft_lora_and_publishes_the_merge(comfy: ComfyClient, base_dir: Path):
    """ZIT Train turbo distill with an SFT LoRA from the loras folder: the distill LoRA and the exact SFT +
    distill merge land in the loras folder, and core nodes sample with the merge."""
    advanced = ADVANCED + "\n[turbo]\nteacher_steps = 8\nteacher_seeds = 1\n"
    prompt = train_prompt("distilled", steps=2, wait=True, turbo="distill", adapter="zit_my_lora.safetensors",
                          advanced=advanced, prompts="")
    comfy.run(prompt, timeout=900)
    loras = base_dir / "models" / "loras" / "zit-trainer" / "distilled"
    assert (loras / "distilled.safetensors").is_file() and (loras / "distilled_merged.safetensors").is_file()
    merged = "zit-trainer/distilled/distilled_merged.safetensors"
    assert comfy.run(sample_prompt(merged, seed=6), timeout=600)["s"]["images"]


def _refusal(comfy: ComfyClient, prompt: dict) -> str:
    status, body = comfy.post_prompt(prompt)
    if status != 200:
        return json.dumps(body)
    entry = comfy.wait(body["prompt_id"], timeout=600)
    assert entry["status"]["status_str"] == "error", "the prompt was not refused"
    return json.dumps(entry["status"]["messages"])


@pytest.mark.parametrize("change, words", [
    (lambda p: p["t"]["inputs"].update(advanced="[optim\nlr = 1"), "invalid TOML"),
    (lambda p: p["t"]["inputs"].update(advanced="[optim]\nsteps = 5"), "optim.steps is set by the steps"),
    (lambda p: p["t"]["inputs"].update(advanced="[optim]\nschedular = 1"), "did you mean optim.scheduler"),
    (lambda p: p["t"]["inputs"].update(advanced="[data]\ntrigger = 'x'"), "ZIT Dataset node"),
    (lambda p: p["t"]["inputs"].update(name="../escape"), "save.name"),
    (lambda p: p["t"]["inputs"].update(adapter="none"), "pick its file in adapter"),
    (lambda p: p["t"]["inputs"].update(advanced="[turbo]\nguidance_scale = 2.0"), "turbo.guidance_scale"),
    (lambda p: p.update(a={"class_type": "ZITTrainingAdapterAttach", "inputs": {
        "model": ["u", 0], "lora_name": ADAPTER, "strength": 1.0}})
     or p["t"]["inputs"].update(model=["a", 0]), "carries LoRA patches"),
    (lambda p: p["d"]["inputs"].update(folder="no_such_dataset"), "does not exist"),
    (lambda p: p["t"]["inputs"].update(resume=True), "has no saved training state"),
    (lambda p: p["t"]["inputs"].update(memory="fp8_swap", gradient_checkpointing=False),
     "set model.gradient_checkpointing = true"),
    (lambda p: p["t"]["inputs"].update(advanced="[model]\nvram = \"12XB\""), "model.vram"),
])
def test_train_node_refuses_bad_settings_before_a_job_starts(comfy: ComfyClient, change, words):
    before = len(get(comfy, "/zit/jobs")["jobs"])
    prompt = train_prompt("refused")
    change(prompt)
    message = _refusal(comfy, prompt)
    assert words in message, message
    assert len(get(comfy, "/zit/jobs")["jobs"]) == before


# --------------------------------------------------------------------------------------------------
# In this process: the encoders' conventions, publishing, choices (no server)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_nodes(comfyui_root: Path) -> Any:
    import importlib

    from conftest import inproc

    inproc.setup(comfyui_root)
    return importlib.import_module(f"{inproc.PACK}.nodes")


def test_node_choices_follow_the_config(pack_nodes: Any):
    from trainer.config import FIELDS

    training, dataset = pack_nodes.training, pack_nodes.dataset
    assert set(training.TURBO) == set(FIELDS["turbo.mode"].choices)
    assert training.OPTIMIZERS == FIELDS["optim.optimizer"].choices
    assert training.MEMORY == FIELDS["model.memory"].choices
    assert training.FAMILY == FIELDS["model.family"].choices
    assert dataset.MISSING_CAPTION == FIELDS["data.missing_caption"].choices
    assert dataset.BAD_IMAGE == FIELDS["data.bad_image"].choices
    assert set(training.OWNED) <= set(FIELDS)


class FakeClip:
    """encode_from_tokens as ComfyUI's Z-Image CLIP returns it: cond (1, L, D) and a (1, L) attention mask."""

    def __init__(self, cond: Any, mask: Any = None):
        self.cond, self.mask, self.texts = cond, mask, []

    def tokenize(self, text: str) -> dict:
        self.texts.append(text)
        return {"qwen3_4b": [[(1, 1.0)]]}

    def encode_from_tokens(self, tokens: dict, return_dict: bool = False) -> dict:
        out = {"cond": self.cond, "pooled_output": None}
        if self.mask is not None:
            out["attention_mask"] = self.mask
        return out


def test_text_encoding_drops_padding_and_keeps_the_engine_length(pack_nodes: Any):
    import torch

    cond = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    encode = pack_nodes.dataset.text_encoder(FakeClip(cond, mask), max_tokens=512)
    assert torch.equal(encode(["a"])[0], cond[0, :4])
    clip = FakeClip(cond)  # no mask (e.g. a CLIP-L): nothing to trim but the engine's 512-token cut
    short = pack_nodes.dataset.text_encoder(clip, max_tokens=5)(["a", ""])
    assert [t.shape for t in short] == [(5, 3), (5, 3)] and clip.texts == ["a", ""]


def test_image_encoding_is_the_engine_latent_convention(pack_nodes: Any):
    import torch

    class FakeVae:
        latent_channels = 16

        def encode(self, images: Any) -> Any:  # ComfyUI: (B,H,W,3) in [0, 1] -> raw latent (B,16,h,w)
            self.seen = images
            return torch.full((1, 16, 2, 2), 1.1159)

    vae = FakeVae()
    pixels = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    z = pack_nodes.dataset.image_encoder(vae)(pixels)
    assert vae.seen.shape == (1, 16, 16, 3)
    assert torch.allclose(vae.seen[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(z, torch.full((1, 16, 2, 2), 0.3611))  # (latent - 0.1159) * 0.3611


def test_publish_mirrors_the_runs_loras_and_only_them(pack_nodes: Any, tmp_path: Path):
    publish = pack_nodes.training_job.publish
    run, target = tmp_path / "run", tmp_path / "loras" / "r"
    run.mkdir()
    for step in (2, 4):
        (run / f"r-step{step:06d}.safetensors").write_bytes(b"lora %d" % step)
    (run / "state-step000004").mkdir()
    (run / "r.safetensors").write_bytes(b"final 4")
    publish(run, target, "r")
    names = ["r-step000002.safetensors", "r-step000004.safetensors", "r.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == names
    (run / "r-step000002.safetensors").unlink()  # pruned by keep_last
    (run / "r-step000006.safetensors").write_bytes(b"lora 6")
    (run / "r.safetensors").unlink()
    (run / "r.safetensors").write_bytes(b"final 6")  # replaced, as the engine's atomic write does
    (target / "other.safetensors").write_bytes(b"not ours")
    publish(run, target, "r")
    names = ["other.safetensors", "r-step000004.safetensors", "r-step000006.safetensors", "r.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == names
    assert (target / "r.safetensors").read_bytes() == b"final 6"


def test_the_public_view_has_no_paths_and_valid_json(pack_nodes: Any):
    import folder_paths

    jobs, out = pack_nodes.jobs, folder_paths.get_output_directory()
    data = jobs.public_data("train-9", "preview", {"step": 2, "path": f"{out}/runs/x/previews/s.png"})
    assert data == {"step": 2, "name": "s.png", "url": "/zit/jobs/train-9/previews/s.png"}
    data = jobs.public_data("train-9", "status", {"status": "failed", "error": f"{out}/cache: bad"})
    assert data["error"] == "<output>/cache: bad"
    assert jobs.public_data("train-9", "progress", {"eta_s": float("inf")}) == {"eta_s": None}


def test_vram_reserve_tracks_the_jobs_working_memory_and_gives_it_back(pack_nodes: Any, monkeypatch):
    """The GPU-memory policy's bookkeeping, with CUDA's counters stubbed (no GPU here)."""
    import comfy.model_management as mm
    import torch

    counters = {"peak": 10 << 30, "now": 4 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: counters.update(peak=counters["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: counters["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: counters["now"])
    base = mm.EXTRA_RESERVED_VRAM
    reserve = pack_nodes.training_job.VramReserve()
    reserve.start()
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base  # no step yet: peak == allocated
    counters["peak"] = 10 << 30  # a step's activations came and went
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (6 << 30)
    counters["peak"] = 9 << 30  # never shrinks while the job runs
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (6 << 30)
    counters["peak"] = 12 << 30
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (8 << 30)
    reserve.release()
    assert mm.EXTRA_RESERVED_VRAM == base

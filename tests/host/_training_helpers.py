"""What the host training tests (test_training_*.py) share: HTTP calls to ComfyUI's routes, polling, the
zit.* events from its websocket, and the API prompts that train (ZIT Dataset -> ZIT Train) and that sample
a LoRA with core nodes.

Training runs inside a real headless ComfyUI (--cpu) on the tiny Z-Image files. The tiny transformer has the
full width (dim 3840, 1 main layer): a bf16 step at 64 px takes about a second on two CPU cores. Jobs get
many steps and are stopped by the tests, so nothing depends on timing.

A test module imports the `events` fixture under its own name (`from _training_helpers import events as
events`): each module then gets its own module-scoped listener, as when it was defined there.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _tiny_models import CLIP, LORAS, UNET, VAE
from conftest import DATASET, ComfyClient

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
                 model: list | None = None, dataset: str = DATASET, every: int = 2) -> dict:
    """Load the tiny files, encode `dataset` (a folder under input/) at 64 px, train rank 4 (saves and
    previews every `every` steps)."""
    return {
        "u": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "c": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "lumina2"}},
        "v": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "d": {"class_type": "ZITDataset", "inputs": {
            "folder": dataset, "clip": ["c", 0], "vae": ["v", 0], "resolutions": str(SIDE), "trigger": "zqx",
            "caption": "", "missing_caption": "error", "caption_ext": ".txt", "recursive": False,
            "min_side": 256, "bad_image": "skip"}},
        "t": {"class_type": "ZITTrain", "inputs": {
            "model": model or ["u", 0], "dataset": ["d", 0], "name": name, "turbo": turbo, "adapter": adapter,
            "steps": steps, "learning_rate": 1e-3, "rank": 4, "optimizer": "adamw", "batch_size": 1,
            "gradient_checkpointing": True, "save_every": every, "preview_prompts": prompts,
            "preview_every": every,
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

"""ZIT Train refusing bad settings in a real headless ComfyUI (--cpu) on the tiny Z-Image files: the prompt
fails with a message naming the problem (bad TOML, engine-owned or misspelt fields, a bad name, adapter or
dataset, a model already carrying LoRA patches, nothing to resume, memory settings) and no job starts.
"""

from __future__ import annotations

import json

import pytest
from _training_helpers import ADAPTER, get, train_prompt
from conftest import ComfyClient


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


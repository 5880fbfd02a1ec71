"""ZIT Train with wait on, in a real headless ComfyUI (--cpu) on the tiny Z-Image files: the prompt blocks
while the job reports progress and Cancel stops the job after saving; a scaled-fp8 file trains in the fp8
memory plan; distill mode trains from an SFT LoRA and publishes the merge. Each LoRA saved applies to the
bf16 model with core nodes.
"""

from __future__ import annotations

from pathlib import Path

from _tiny_models import UNET_FP8
from _training_helpers import ADVANCED, Events, call, get, job, sample_prompt, train_prompt, until
from _training_helpers import events as events  # a fixture (module-scoped here)
from conftest import ComfyClient


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

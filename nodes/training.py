"""ZIT Train and ZIT Stop Training: a LoRA training job on a background thread, beside ComfyUI's queue.

Where things go (names, not paths, reach the browser):
- the run: <output>/zit-trainer/runs/<name>/ (step LoRAs, training states, previews); the cache is
  <output>/zit-trainer/cache (written by ZIT Dataset);
- the LoRAs: every step LoRA and the final one are mirrored (hard links, else copies) into
  <loras>/zit-trainer/<name>/ as they are saved, so core LoRA loaders list them; the node's lora_name
  output is `zit-trainer/<name>/<name>.safetensors`. Training states never enter the loras folder.

The training job itself (its folders, its work on a thread, its VRAM reserve, waiting for it) is in
nodes/training_job.py; the config the node builds (owned keys, advanced TOML, widget choices) in
nodes/training_config.py.
"""

from __future__ import annotations

from typing import Any

import folder_paths
from comfy_api.latest import io, ui

from . import jobs
from .dataset import CATEGORY, WORK_FOLDER, ZitDataset, ZitDatasetType
from .training_config import (  # noqa: F401 - OWNED and the choices are read by the host tests from here
    DEFAULT_DEVICE,
    FAMILY,
    MEMORY,
    NONE,
    OPTIMIZERS,
    OWNED,
    TURBO,
    USES_ADAPTER,
    Settings,
    build_config,
    parse_advanced,
    prompt_lines,
)
from .training_job import fresh_name, lora_name, make_run, runs_root, wait_with_progress

ZitJobType = io.Custom("ZIT_JOB")
FAMILY_TIP = (
    "Which Z-Image the model input is. auto: what its file says (metadata, a diffusers folder's scheduler), "
    "else Turbo (the log says it was assumed). base: the non-distilled Z-Image; deturbo: Z-Image-De-Turbo; "
    "both train with turbo 'base'. A choice the file contradicts is refused.")
MEMORY_TIP = (
    "How the frozen base sits on the GPU. auto: the planner picks the first plan that fits the free VRAM "
    "(bf16, then bf16 with block swap, then fp8 with block swap; set [model] memory_preference = \"speed\" "
    "in advanced to try fp8 before swapping). bf16: the whole model in bf16 (about 18 GB at 1024 px). fp8: "
    "block weights in float8 (about 11 GB). *_swap: only some main blocks stay on the GPU, the rest stream "
    "from CPU memory each step (slower; [model] swap_blocks sets how many). nf4/int8: bitsandbytes QLoRA "
    "(pip install bitsandbytes). The chosen plan and its predicted peak appear in the log and the ZIT panel.")
TURBO_TIP = (
    "How the LoRA keeps 8-step turbo sampling. adapter: train over the de-distilling training adapter "
    "(merged in the job), then load the LoRA without it and sample 8 steps at cfg 1. adapter_dg: the same "
    "plus differential guidance from the frozen base (turbo.guidance_scale in advanced). sft: plain LoRA on "
    "ZIT; sample it de-turbo (about 30 steps, cfg 2) or 8 steps with the DistillPatch attached. distill: "
    "pick an SFT LoRA in adapter; the job samples base + that LoRA de-turbo once per caption and seed and "
    "trains a distill LoRA that makes it sample in 8 steps at cfg 1 (saved alone and merged with the SFT "
    "LoRA as <name>_merged). base: plain LoRA on Z-Image base or De-Turbo (set family), previewed de-turbo; "
    "to also preview it on Turbo at 8 steps, set [preview] turbo_model = \"<path>\" in advanced.")


def device_choices() -> list[str]:
    """default, plus cuda:N for each GPU when there are several (torch is loaded by ComfyUI already)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [DEFAULT_DEVICE, *(f"cuda:{i}" for i in range(count))] if count > 1 else [DEFAULT_DEVICE]


ADVANCED_EXAMPLE = "# e.g.\n# [optim]\n# scheduler = \"cosine\"\n# warmup_steps = 100\n"


def adapter_choices() -> tuple[list[str], str]:
    """'none' and the loras; the default is the first whose name says training adapter, else 'none'."""
    names = folder_paths.get_filename_list("loras")
    pick = next((n for n in names if "training_adapter" in n.lower()), None)
    pick = pick or next((n for n in names if "adapter" in n.lower()), NONE)
    return [NONE, *names], pick


# ---- the nodes -------------------------------------------------------------------------------------------


def _model_file(model: Any) -> str:
    """The trainable file/folder behind a MODEL; ZitError saying what to do for any other MODEL."""
    from ..trainer.errors import ZitError
    from ..trainer.model import checkpoint_spec
    from .loaders import model_source

    source = model_source(model)
    if source is None:
        raise ZitError("ZIT Train reloads the model from its file, and this MODEL has none it knows: load it "
                       "with 'Load Diffusion Model' (UNETLoader) or 'Load ZIT' from a diffusion_models file "
                       "or a diffusers folder")
    if getattr(model, "patches", None):
        raise ZitError("this MODEL carries LoRA patches (a LoRA loader or an adapter attach node): ZIT Train "
                       "trains on the plain base reloaded from its file, so connect the loader's MODEL "
                       "directly; choose the training adapter with the turbo and adapter inputs")
    checkpoint_spec(source.path)  # a trainable Z-Image transformer (not fp8, GGUF, Nunchaku, Flux, ...)
    return source.path


class ZITTrain(io.ComfyNode):
    """Start a ZIT LoRA training job on a background thread (optionally wait for it)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adapters, adapter_default = adapter_choices()
        return io.Schema(
            node_id="ZITTrain",
            display_name="ZIT Train LoRA",
            category=CATEGORY,
            description=(
                "Trains a Z-Image-Turbo LoRA on a background thread and returns at once, so ComfyUI's "
                "queue keeps running (turn on wait to block until it ends, with progress here; Cancel stops "
                "it after saving). The job reloads its own copy of the model from the MODEL's file (Load "
                "Diffusion Model or Load ZIT), frees ComfyUI's VRAM before it starts, trains from the cache "
                "ZIT Dataset wrote, and saves step LoRAs into models/loras/zit-trainer/<name>/ for any LoRA "
                "loader. Follow it in the ZIT panel or at /zit/jobs; stop it with 'ZIT Stop Training'."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The Z-Image diffusion model (Turbo; or the base / De-Turbo with turbo 'base') from "
                    "'Load Diffusion Model' or 'Load ZIT' (bf16/fp32/fp8 file or diffusers folder, no LoRA "
                    "attached). The job loads its own copy from that file.")),
                ZitDatasetType.Input("dataset", tooltip="The encoded dataset from ZIT Dataset."),
                io.String.Input("name", default="zit_lora", tooltip=(
                    "Run and LoRA name. The LoRA is saved as zit-trainer/<name>/<name>.safetensors in the "
                    "loras folder; if that run already exists a counter is added (name_001, ...) unless "
                    "resume is on.")),
                io.Combo.Input("turbo", options=list(TURBO), default="adapter", tooltip=TURBO_TIP),
                io.Combo.Input("adapter", options=adapters, default=adapter_default, tooltip=(
                    "The training adapter LoRA (ostris zimage_turbo_training_adapter v1/v2) from the loras "
                    "folder, merged into the base while training (turbo adapter/adapter_dg); not saved into "
                    "the LoRA. Unused with sft.")),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip=(
                    "Optimizer steps; 2000-3000 suit a ZIT style or character LoRA at lr 1e-4.")),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=10.0, step=1e-5, round=1e-8,
                               tooltip="Peak learning rate (prodigy: a multiplier of its estimate, use 1)."),
                io.Int.Input("rank", default=32, min=1, max=4096, tooltip=(
                    "LoRA rank; alpha follows it (scale 1) unless lora.alpha is set in advanced.")),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", tooltip=(
                    "Optimizer: adamw (default), adamw8bit (needs bitsandbytes), lion, prodigy (needs "
                    "prodigyopt; lr about 1.0), adafactor.")),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip=(
                    "Samples per step (from one aspect bucket).")),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip=(
                    "Recompute activations in the backward pass: much less VRAM, about 30% slower.")),
                io.Int.Input("save_every", default=250, min=0, max=1000000, tooltip=(
                    "Save a step LoRA (and a resumable training state) every N steps; 0 = only at the end. "
                    "A stopped or failed run keeps its last save.")),
                io.String.Input("preview_prompts", default="", multiline=True, tooltip=(
                    "Preview prompts, one per line, sampled with the LoRA (adapter off, 8 steps, cfg 1) "
                    "every preview_every steps; empty = no previews.")),
                io.Int.Input("preview_every", default=250, min=0, max=1000000, tooltip=(
                    "Sample the preview prompts every N steps (0 = never).")),
                # "fixed" (what io.ControlAfterGenerate.fixed, a str enum, is on newer ComfyUI): the
                # frontend's default for a seed is "randomize", which would make re-queuing retrain.
                io.Int.Input("seed", default=42, min=0, max=2**63 - 1, control_after_generate="fixed",
                             tooltip=(
                    "Seed of the run (LoRA init, noise, timesteps, data order). Its control-after-generate "
                    "widget starts at fixed, so queuing the same prompt again does not start a new run with "
                    "another seed; set it to randomize or increment to train variants.")),
                io.Boolean.Input("wait", default=False, tooltip=(
                    "Block this prompt until training ends (progress on the node, Cancel stops the job). "
                    "Off: return at once and let the queue run other prompts while it trains.")),
                io.Boolean.Input("resume", default=False, tooltip=(
                    "Continue the run called name from its latest saved training state instead of starting "
                    "a new run.")),
                io.String.Input("advanced", default="", multiline=True, placeholder=ADVANCED_EXAMPLE,
                                tooltip=(
                    "More settings as TOML tables, checked when queued, e.g. [optim] scheduler = \"cosine\", "
                    "[lora] targets = \"attention\", [objective] timesteps = \"turbo\", [model] dtype = "
                    "\"fp16\", [preview] width = 768. Keys set by the inputs above are refused.")),
                io.Combo.Input("memory", options=list(MEMORY), default="auto", optional=True,
                               tooltip=MEMORY_TIP),
                io.Combo.Input("family", options=list(FAMILY), default="auto", optional=True,
                               tooltip=FAMILY_TIP),
                io.Combo.Input("device", options=device_choices(), default=DEFAULT_DEVICE, optional=True,
                               tooltip=(
                    "The GPU the job trains on. default: ComfyUI's own device; with several GPUs, cuda:N "
                    "trains on another one so ComfyUI keeps its GPU free for sampling.")),
            ],
            outputs=[
                io.Combo.Output(display_name="lora_name", tooltip=(
                    "The loras-folder name of the trained LoRA (zit-trainer/<name>/<name>.safetensors), for "
                    "ZIT LoRA Loader (Block Weight). It exists once the first save is written (at the end "
                    "with wait on).")),
                ZitJobType.Output(display_name="job", tooltip="The training job, for ZIT Stop Training."),
            ],
            is_output_node=True,
            search_aliases=["zit train", "train lora", "lora training", "z-image lora trainer"],
        )

    @classmethod
    def validate_inputs(cls, advanced: str | None = None) -> bool | str:
        """The advanced TOML is checked when the prompt is queued (the rest when the node runs)."""
        from ..trainer.config import ConfigError

        try:
            parse_advanced(advanced or "")
        except ConfigError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model: Any, dataset: ZitDataset, name: str, turbo: str, adapter: str, steps: int,
                learning_rate: float, rank: int, optimizer: str, batch_size: int,
                gradient_checkpointing: bool, save_every: int, preview_prompts: str, preview_every: int,
                seed: int, wait: bool, resume: bool, advanced: str, memory: str = "auto",
                family: str = "auto", device: str = DEFAULT_DEVICE) -> io.NodeOutput:
        import comfy.model_management

        from ..trainer.config import check_field
        from ..trainer.data import cached_text_embeddings
        from ..trainer.errors import ZitError
        from ..trainer.job import FAILED

        transformer = _model_file(model)
        name = check_field("save.name", name)
        if turbo == "distill" and adapter == NONE:
            raise ZitError("turbo 'distill' distills an SFT LoRA: pick it in adapter (a LoRA trained with "
                           "turbo sft, from models/loras)")
        if turbo in USES_ADAPTER and adapter == NONE:
            raise ZitError(f"turbo {turbo!r} trains over the training adapter: pick its file in adapter "
                           "(e.g. zimage_turbo_training_adapter_v2.safetensors in models/loras), or use "
                           "turbo sft")
        adapter_file = (folder_paths.get_full_path_or_raise("loras", adapter) if turbo in USES_ADAPTER
                        else None)
        if resume:
            from ..trainer.checkpoint import list_checkpoints

            if not any(c.state for c in list_checkpoints(runs_root() / name, name)):
                raise ZitError(f"resume: run {name!r} has no saved training state in "
                               f"<output>/{WORK_FOLDER}/runs/{name}; turn resume off to start it")
        else:
            name = fresh_name(name)
        settings = Settings(name, turbo, adapter_file, steps, learning_rate, rank, optimizer, batch_size,
                            gradient_checkpointing, memory, family, device, save_every,
                            prompt_lines(preview_prompts),
                            preview_every, seed, advanced)
        cfg = build_config(settings, transformer, dataset)
        if cfg.preview.every and dataset.vae_file is None:
            raise ZitError("previews need the VAE loaded from a file (Load VAE, or Load ZIT with a vae file) "
                           "so the job can decode them; or leave preview_prompts empty")
        if cfg.preview.prompts:  # the job never runs the text encoder: encode the prompts here
            cached_text_embeddings([*cfg.preview.prompts, ""], cfg.cache_path, dataset.encode_text,
                                   dataset.te_id)
        busy = jobs.running()
        if busy:
            raise ZitError(f"training job {busy[0].id} ({busy[0].name}) is still running; stop it first "
                           "(ZIT Stop Training, or the ZIT panel)")
        comfy.model_management.unload_all_models()  # the prompt thread: the one place ComfyUI's models move
        comfy.model_management.soft_empty_cache()
        job = jobs.start(make_run(cfg, dataset), resume=bool(resume))
        if wait:
            wait_with_progress(job, cfg.optim.steps)
            if job.status == FAILED:
                raise ZitError(f"training job {job.id} failed: {job.error}")
            text = f"training job {job.id} {job.status} at step {job.result.step}: {lora_name(name)}"
        else:
            text = (f"training job {job.id} started: {cfg.optim.steps} steps, LoRA {lora_name(name)} "
                    f"(follow it in the ZIT panel)")
        return io.NodeOutput(lora_name(name), job, ui=ui.PreviewText(text))


class ZITStopTraining(io.ComfyNode):
    """Ask a training job (or every running one) to stop; it saves a checkpoint first."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITStopTraining",
            display_name="ZIT Stop Training",
            category=CATEGORY,
            description=(
                "Stops a ZIT training job gracefully: it finishes its step, saves a LoRA and a resumable "
                "state, and ends as 'stopped' (resume it from the ZIT panel or POST /zit/jobs/{id}/resume). "
                "Queue it on its own: linked to ZIT Train in the same prompt it would stop the job at once."),
            inputs=[
                io.String.Input("job_id", default="", tooltip=(
                    "A job id from the ZIT panel or /zit/jobs (e.g. train-1); empty with no job input = "
                    "every running training job.")),
                ZitJobType.Input("job", optional=True, tooltip="The job from ZIT Train (optional)."),
            ],
            outputs=[],
            is_output_node=True,
            search_aliases=["zit stop", "stop training", "cancel training"],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> float:
        return float("nan")  # never cached: every queued Stop acts

    @classmethod
    def execute(cls, job_id: str = "", job: Any = None) -> io.NodeOutput:
        if job is not None:
            targets = [job]
        elif job_id.strip():
            targets = [jobs.get(job_id.strip())[0]]
        else:
            targets = jobs.running()
        lines = [f"stop requested: {t.id} ({t.name})" if t.stop() else
                 f"{t.id} had already ended ({t.status})" for t in targets]
        return io.NodeOutput(ui=ui.PreviewText("\n".join(lines) or "no training job is running"))

"""ZIT LoRA nodes: block-weight loader, merge & save, inspect, convert; the engine is imported in execute."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

CATEGORY = "ZIT/LoRA"
NONE = "none"
# Kept in step with trainer.lora.formats.DIALECTS / inspect.METRICS (a test checks), so importing stays light.
DIALECTS = ("aitoolkit", "diffusers", "diffsynth", "kohya", "comfy", "lycoris")
DIALECT_TIP = (
    "Key layout of the written file: aitoolkit (diffusion_model.*.lora_A/B, read by ComfyUI, diffusers and "
    "ai-toolkit), diffusers (transformer.*), diffsynth, kohya (lora_unet_*: core ComfyUI loads only its "
    "FFN/adaLN), comfy (ComfyUI-native fused qkv) or lycoris. The scale is folded in (alpha = rank).")
DTYPES = ("keep", "bf16", "fp16", "fp32")
METRICS = ("norm", "erank", "rank")
MAX_MERGE = 4


def lora_input(id: str = "lora_name", tooltip: str = ("A LoRA file from the loras folders (any ZIT dialect), "
                                                      "or a LyCORIS LoKr / LoHa / full-diff file."),
               hint: str | None = None, none: bool = False, optional: bool = False) -> io.Combo.Input:
    """A combo over the loras folders; default: the first name containing `hint`; `none` adds "none"."""
    names = folder_paths.get_filename_list("loras")
    options = [NONE, *names] if none else names
    default = NONE if none else next((n for n in names if hint and hint in n.lower()), None)
    return io.Combo.Input(id, options=options, default=default, tooltip=tooltip, optional=optional)


def _strength(tooltip: str, id: str = "strength") -> io.Float.Input:
    return io.Float.Input(id, default=1.0, min=-100.0, max=100.0, step=0.01, tooltip=tooltip)


def _prefix_input(default: str) -> io.String.Input:
    return io.String.Input("filename_prefix", default=default, tooltip=(
        "File name (subfolders allowed) inside the first loras folder, without extension; if it exists a "
        "counter is added (_001, _002, ...), an existing file is never overwritten."))


def _dtype_input() -> io.Combo.Input:
    return io.Combo.Input("dtype", options=list(DTYPES), default="keep",
                          tooltip="Precision of the written tensors; keep = as computed from the inputs.")


def _dtype(name: str) -> str | None:
    return None if name == "keep" else name


def _save_new(lora: Any, prefix: str, dialect: str, dtype: str | None) -> str:
    """Write `lora` to a new file in the first loras folder (never overwriting); returns its picker name."""
    from ..trainer.errors import ZitError
    from ..trainer.lora.writing import write_lora

    root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    rel = prefix.strip().replace("\\", "/").removesuffix(".safetensors")
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ":" in rel or any(p in ("", ".", "..") for p in parts):
        raise ZitError(f"filename_prefix {prefix!r}: give a relative name inside the loras folder, "
                       f"e.g. zit/merged")
    folder = root.joinpath(*parts[:-1])
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / f".{parts[-1]}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    write_lora(lora, staged, dialect, dtype)
    try:
        for n in range(100000):
            target = folder / (f"{parts[-1]}.safetensors" if n == 0 else f"{parts[-1]}_{n:03d}.safetensors")
            try:
                os.link(staged, target)  # atomic and never replaces an existing file
            except FileExistsError:
                continue
            except OSError:  # no hard links on this filesystem: check, then rename
                if target.exists():
                    continue
                os.replace(staged, target)
            return target.relative_to(root).as_posix()
        raise ZitError(f"{folder}: no free file name for {parts[-1]!r}")
    finally:
        staged.unlink(missing_ok=True)


class ZITLoraLoaderBlockWeight(io.ComfyNode):
    """Apply a ZIT LoRA with block and component weights through exact ComfyUI patches."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITLoraLoaderBlockWeight",
            display_name="ZIT LoRA Loader (Block Weight)",
            category=CATEGORY,
            description=(
                "Applies a Z-Image LoRA (any dialect, including kohya/musubi q/k/v that core ComfyUI skips) "
                "or a LyCORIS LoKr / LoHa / full-diff file (through ComfyUI's own LoKr, LoHa and diff "
                "patches) with a weight per block (BASE, L00..L29, NR0, NR1, CR0, CR1) and per component. "
                "With all weights 1 it patches exactly what ComfyUI's LoRA loader patches; a weight of 0 "
                "adds no patch. Chain several, or with other LoRA loaders."),
            inputs=[
                io.Model.Input("model", tooltip="The Z-Image-Turbo diffusion model to patch."),
                lora_input(),
                _strength("Overall strength of the LoRA (multiplies every block and component weight)."),
                io.String.Input("blocks", default="all", tooltip=(
                    "Block weights: a preset (all, none, early, middle, late, no-early, no-middle, "
                    "no-late, attention-only, ffn-only, no-adaLN, refiners-off, main-only, no-base), a comma "
                    "vector of 1, 30, 31, 34 or 35 numbers (BASE, L00..L29, NR0, NR1, CR0, CR1), or "
                    "assignments such as "
                    "'%default=0,L10-19=1,NR=0.5'.")),
                io.String.Input("components", default="", tooltip=(
                    "Component multipliers, e.g. 'adaLN=0,q=1,k=1,v=0.5' (also attn, qkv, ffn, %default); "
                    "unlisted components are 1.")),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA patches added."),
                io.String.Output(display_name="vector", tooltip="The resolved 35-value block vector "
                                 "(BASE, L00..L29, NR0, NR1, CR0, CR1)."),
            ],
            search_aliases=["zit lora block weight", "lora block weight", "z-image lora"],
        )

    @classmethod
    def execute(cls, model: Any, lora_name: str, strength: float, blocks: str = "all",
                components: str = "") -> io.NodeOutput:
        from ..trainer.lora.blocks import resolve
        from . import patching

        weights = resolve(blocks, components)
        if strength == 0:
            return io.NodeOutput(model, weights.vector_string())
        lora = patching.read_adapter_file(lora_name, patching.model_spec(model))
        return io.NodeOutput(patching.attach(model, lora, strength, weights), weights.vector_string())


def _merge_inputs() -> list[io.Input]:
    inputs: list[io.Input] = []
    for i in range(1, MAX_MERGE + 1):
        optional = i > 1
        inputs += [
            lora_input(f"lora_{i}", f"LoRA {i} of the merge" + (" ('none' = unused)." if optional else "."),
                       none=optional, optional=optional),
            io.Float.Input(f"ratio_{i}", default=1.0, min=-100.0, max=100.0, step=0.01, optional=optional,
                           tooltip=f"Weight of LoRA {i}: its dW is multiplied by this."),
            io.String.Input(f"blocks_{i}", default="all", optional=optional,
                            tooltip=f"Block weights of LoRA {i}: a preset, a comma vector or assignments "
                                    "(same syntax as the block-weight loader)."),
        ]
    return inputs


class ZITLoraMergeSave(io.ComfyNode):
    """Merge up to four ZIT LoRAs (ratios and block vectors) into a new file in the loras folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITLoraMergeSave",
            display_name="ZIT LoRA Merge & Save",
            category=CATEGORY,
            description=(
                "Merges up to four Z-Image-Turbo LoRAs, each with a ratio and a block vector, and saves the "
                "result into the first loras folder (LoRA pickers list it after a refresh). 'exact' sums the "
                "full updates without cross terms (rank = sum of ranks); 'svd' truncates that sum to the "
                "given rank. A LyCORIS input (LoKr / LoHa / full diff) is first converted to its best "
                "LoRA of that rank. Returns the saved file name."),
            inputs=[
                *_merge_inputs(),
                io.Combo.Input("mode", options=["exact", "svd"], default="exact",
                               tooltip="exact: concatenated factors, no approximation; svd: best rank-r "
                                       "approximation of the summed update."),
                io.Int.Input("rank", default=32, min=1, max=4096,
                             tooltip="Target rank per module for mode 'svd'. Also the rank a LyCORIS input "
                                     "(LoKr / LoHa / full diff) is first converted to (best rank-r "
                                     "approximation of its dW), in both modes."),
                io.Combo.Input("dialect", options=list(DIALECTS), default="aitoolkit", tooltip=DIALECT_TIP),
                _dtype_input(),
                _prefix_input("zit_merged"),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name as LoRA pickers list it.")],
            is_output_node=True,
            search_aliases=["zit merge lora", "lora merge", "merge lora block weight"],
        )

    @classmethod
    def execute(cls, mode: str, rank: int, dialect: str, dtype: str, filename_prefix: str,
                **kwargs: Any) -> io.NodeOutput:
        from ..trainer.errors import ZitError
        from ..trainer.lora.blocks import resolve
        from ..trainer.lora.canonical import Lora
        from ..trainer.lora.merge import merge_exact, merge_svd
        from . import patching

        items = []
        for i in range(1, MAX_MERGE + 1):
            name = kwargs.get(f"lora_{i}", NONE)
            if name in (None, NONE):
                continue
            lora = patching.read_lora_file(name, rank=rank)
            named = Lora(lora.modules, {**lora.metadata, "zit.name": name}, lora.spec)
            weights = resolve(kwargs.get(f"blocks_{i}", "all"), "", kwargs.get(f"ratio_{i}", 1.0))
            items.append((named, weights))
        if not items:
            raise ZitError("merge: choose at least one LoRA")
        merged = merge_exact(items) if mode == "exact" else merge_svd(items, rank=rank)[0]
        saved = _save_new(merged, filename_prefix, dialect, _dtype(dtype))
        return io.NodeOutput(saved, ui=ui.PreviewText(f"saved {saved}"))


class ZITLoraInspect(io.ComfyNode):
    """Per-block, per-component statistics of a ZIT LoRA as a heatmap image and a text table."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITLoraInspect",
            display_name="ZIT LoRA Inspect",
            category=CATEGORY,
            description=(
                "Shows where a Z-Image-Turbo LoRA acts: a heatmap (blocks x components) of the norm, "
                "effective rank or rank of each module's update, and a text table of norms and ranks. A "
                "LyCORIS file (LoKr / LoHa / full diff) shows its real dW: exact norms, effective and "
                "numerical rank, and each module's adapter kind."),
            inputs=[
                lora_input(),
                io.Combo.Input("metric", options=list(METRICS), default="norm", tooltip=(
                    "Heatmap value: norm = Frobenius norm of dW, erank = effective rank of dW, "
                    "rank = nominal rank.")),
            ],
            outputs=[
                io.Image.Output(display_name="heatmap", tooltip="The heatmap image (connect a preview)."),
                io.String.Output(display_name="table", tooltip="Norms, effective and nominal ranks as text."),
            ],
            search_aliases=["zit lora inspect", "lora heatmap", "lora stats"],
        )

    @classmethod
    def execute(cls, lora_name: str, metric: str = "norm") -> io.NodeOutput:
        import numpy as np
        import torch

        from ..trainer.lora.inspect import heatmap_png, stats_table
        from ..trainer.lora.lycoris import DeltaFile
        from . import patching

        lora = patching.read_adapter_file(lora_name)
        if isinstance(lora, DeltaFile):  # LoKr / LoHa / diff: stats of the real dW, norms from module_norms
            from ..trainer.lora.any_file import delta_stats, describe

            stats = delta_stats(lora)
            image = heatmap_png(stats, None, metric, spec=lora.spec)
            table = f"{describe(lora)}\n\n{stats_table(stats, lora.spec, rank_label='numerical rank of dW')}"
        else:
            image, table = heatmap_png(lora, None, metric), stats_table(lora)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(pixels, table)


class ZITLoraConvert(io.ComfyNode):
    """Rewrite a ZIT LoRA in another dialect."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITLoraConvert",
            display_name="ZIT LoRA Convert",
            category=CATEGORY,
            description=(
                "Reads a Z-Image-Turbo LoRA of any dialect and writes it in the chosen one (same update dW, "
                "scale folded in) as a new file in the first loras folder. A LyCORIS file (LoKr / LoHa / "
                "full diff) becomes its best LoRA of the given rank (the relative error is shown). Returns "
                "the saved file name."),
            inputs=[
                lora_input(),
                io.Combo.Input("dialect", options=list(DIALECTS), default="aitoolkit", tooltip=DIALECT_TIP),
                _dtype_input(),
                io.String.Input("filename_prefix", default="", tooltip=(
                    "File name (subfolders allowed) in the first loras folder, without extension; empty = "
                    "the input's name plus _<dialect>. An existing file is never overwritten: a counter is "
                    "added.")),
                io.Int.Input("rank", default=32, min=1, max=4096, optional=True, tooltip=(
                    "LyCORIS inputs only (LoKr / LoHa / full diff): the rank of the LoRA they become, the "
                    "best rank-r approximation of each module's dW. Ignored for a LoRA input.")),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name as LoRA pickers list it.")],
            is_output_node=True,
            search_aliases=["zit convert lora", "lora format", "lora dialect"],
        )

    @classmethod
    def execute(cls, lora_name: str, dialect: str, dtype: str = "keep", filename_prefix: str = "",
                rank: int = 32) -> io.NodeOutput:
        from ..trainer.lora.any_file import error_report
        from ..trainer.lora.lycoris import DeltaFile, delta_to_lora
        from . import patching

        lora, note = patching.read_adapter_file(lora_name), ""
        if isinstance(lora, DeltaFile):
            delta = lora
            lora, errors = delta_to_lora(delta, rank=rank)
            note = "\n" + error_report(delta, lora, errors, rank, None)
        prefix = filename_prefix.strip() or f"{lora_name.rsplit('.', 1)[0]}_{dialect}"
        saved = _save_new(lora, prefix, dialect, _dtype(dtype))
        return io.NodeOutput(saved, ui=ui.PreviewText(f"saved {saved}{note}"))

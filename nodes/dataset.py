"""ZIT Dataset: a folder of images and captions encoded with the graph's VAE and text encoder into the
engine's cache, so the training job never loads either.

The node runs in ComfyUI's prompt thread and uses ComfyUI's own models and memory management (`vae.encode`,
`clip.encode_from_tokens`). What it writes is exactly what the engine's own encoders would write
(trainer.data: same scan, buckets, pixel preprocessing, cache keys and files):

- latents: the engine's pixels (EXIF, RGB on white, Lanczos cover, centre crop) go to ComfyUI as
  (1,H,W,3) in [0,1]; ComfyUI's Flux VAE returns the posterior mode (as the engine's), and
  `comfy.latent_formats.Flux().process_in` gives ZIT's z = (latent - 0.1159) * 0.3611.
- text: ComfyUI's Z-Image text encoder (CLIPLoader type lumina2 on qwen_3_4b) wraps the caption in the same
  chat turn as diffusers' template with enable_thinking ("<|im_start|>user\\n{caption}<|im_end|>\\n
  <|im_start|>assistant\\n"), takes hidden_states[-2] (layer -2, no final norm) and pads nothing for one
  caption; the node drops positions the attention mask marks as padding (when ComfyUI gives a mask) and keeps
  the first 512 tokens, which is diffusers' truncation exactly, Qwen3 being causal. Differences that remain:
  the numbers come from ComfyUI's Qwen3 implementation in its own dtype/device (close to, not bitwise,
  transformers'), and a text encoder of another family (e.g. a CLIP-L loaded as lumina2) gives its own
  width and padding, which only a transformer with that cap_feat_dim accepts.

Cache keys carry `comfy-vae:` / `comfy-te:` identities made from the loader's recipe (the file's identity,
e.g. VAELoader / CLIPLoader / Load ZIT files) or, without one, from the weights themselves, so ComfyUI's
encodings and the CLI's never mix. Everything lands in <output>/zit-trainer/cache.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

CATEGORY = "ZIT/Training"
WORK_FOLDER = "zit-trainer"
MISSING_CAPTION = ("error", "skip", "trigger")
BAD_IMAGE = ("skip", "error")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VAE_CHANNELS = 16

ZitDatasetType = io.Custom("ZIT_DATASET")


def work_root() -> Path:
    """<ComfyUI output>/zit-trainer: the cache and the runs (training states, previews) live here."""
    return Path(folder_paths.get_output_directory()) / WORK_FOLDER


@dataclass
class ZitDataset:
    """What ZIT Train needs from the dataset node: the scan, its settings, the cache and the encoders' ids.

    `encode_text` encodes more prompts (the preview prompts) with the same text encoder, in the prompt thread.
    `vae_file` is the VAE's file for previews (None when the VAE did not come from a file).
    """

    dataset: Any  # trainer.data.Dataset
    data: dict[str, Any]  # the data.* settings of the scan, for the training config
    cache_dir: Path
    vae_id: str
    te_id: str
    vae_file: str | None
    te_file: str | None
    encode_text: Any  # list[str] -> list[(L, hidden)]

    def __repr__(self) -> str:
        return f"ZitDataset({len(self.dataset.samples)} samples from {self.dataset.folder.name})"


# ---- identities ------------------------------------------------------------------------------------------


def _files(value: Any) -> list[str]:
    """The existing files named by a loader-recipe argument (a path or a list of paths)."""
    items = value if isinstance(value, list | tuple) else [value]
    return [str(v) for v in items if isinstance(v, str | os.PathLike) and os.path.isfile(v)]


def recipe_files(patcher: Any) -> tuple[str, list[str]] | None:
    """(loader function name, files it read) of a ModelPatcher's cached_patcher_init, or None."""
    init = getattr(patcher, "cached_patcher_init", None)
    if not init:
        return None
    files = [f for arg in init[1] for f in _files(arg)]
    return (getattr(init[0], "__name__", "loader"), files) if files else None


def _weights_identity(module: Any) -> str:
    """Names, shapes, dtypes and the first values of every tensor: an identity when no file is known."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.device.type != "meta" and tensor.numel():
            with torch.inference_mode():
                h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(kind: str, patcher: Any, module: Any, extra: str = "") -> str:
    from ..trainer.run_models import file_identity

    recipe = recipe_files(patcher)
    if recipe is not None:
        loader, files = recipe
        body = f"{loader}:" + ",".join(file_identity(f) for f in files)
    else:
        body = f"weights:{_weights_identity(module)}"
    return f"comfy-{kind}:{extra}{body}"


def vae_identity(vae: Any) -> str:
    """The cache identity of a ComfyUI VAE."""
    return _identity("vae", vae.patcher, vae.first_stage_model)


def text_identity(clip: Any) -> str:
    """The cache identity of a ComfyUI CLIP (its model class and layer are part of the encoding)."""
    model = clip.cond_stage_model
    return _identity("te", clip.patcher, model, f"{type(model).__name__}:{clip.layer_idx}:")


def vae_file(vae: Any) -> str | None:
    """The file a VAE was loaded from (VAELoader, Load ZIT) for the job's previews, or None."""
    recipe = recipe_files(vae.patcher)
    return recipe[1][0] if recipe and recipe[0] == "load_vae_patcher" else None


def text_file(clip: Any) -> str | None:
    """The file a text encoder was loaded from (CLIPLoader, Load ZIT), or None."""
    recipe = recipe_files(clip.patcher)
    return recipe[1][0] if recipe and len(recipe[1]) == 1 else None


# ---- encoders --------------------------------------------------------------------------------------------


def image_encoder(vae: Any) -> Any:
    """(1,3,H,W) pixels in [-1,1] -> ZIT latent (16,h,w) through ComfyUI's VAE and the Flux latent format."""
    import comfy.latent_formats

    if getattr(vae, "latent_channels", None) != VAE_CHANNELS:
        channels = getattr(vae, "latent_channels", "?")
        raise ValueError(f"this VAE has {channels} latent channels; Z-Image needs the 16-channel Flux VAE "
                         "(ae.safetensors)")
    latent_format = comfy.latent_formats.Flux()

    def encode(pixels: Any) -> Any:
        images = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        return latent_format.process_in(vae.encode(images).float())

    return encode


def text_encoder(clip: Any, max_tokens: int) -> Any:
    """list of captions -> list of (L, hidden) through ComfyUI's CLIP: padding dropped, at most max_tokens."""

    def encode(captions: list[str]) -> list[Any]:
        out = []
        for caption in captions:
            result = clip.encode_from_tokens(clip.tokenize(caption), return_dict=True)
            cond = result["cond"][0]
            mask = result.get("attention_mask")
            if mask is not None and mask.shape[-1] == cond.shape[0]:
                cond = cond[mask.reshape(-1) != 0]
            out.append(cond[:max_tokens])
        return out

    return encode


# ---- the folder ------------------------------------------------------------------------------------------


def resolve_folder(folder: str) -> Path:
    """A folder name inside ComfyUI's input folder, or an absolute path."""
    text = folder.strip()
    if not text:
        raise ValueError("folder is empty: give a folder inside ComfyUI's input folder or an absolute path")
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path


def folder_fingerprint(folder: Path, recursive: bool, caption_ext: str) -> str:
    """Names, sizes and modification times of the images and caption files: changes when the folder does."""
    h = hashlib.sha256(str(folder).encode())
    if not folder.is_dir():
        return "missing:" + h.hexdigest()
    wanted = {*IMAGE_EXTENSIONS, caption_ext.lower()}
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _, names in walk:
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.splitext(name)[1].lower() in wanted and os.path.isfile(path):
                stat = os.stat(path)
                h.update(f"{os.path.relpath(path, folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def parse_resolutions(text: str) -> tuple[int, ...]:
    """'512, 768,1024' -> (512, 768, 1024), checked as data.resolutions."""
    from ..trainer.config import check_field

    try:
        values = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"resolutions {text!r}: give whole numbers separated by commas, e.g. 1024 or "
                         "512,768,1024") from None
    return check_field("data.resolutions", values)


def _summary(dataset: Any, encoded: dict[str, int]) -> str:
    buckets = ", ".join(f"{w}x{h}: {n}" for (w, h), n in dataset.bucket_counts().items())
    lines = [f"{len(dataset.images)} images, {len(dataset.samples)} samples ({buckets})",
             f"encoded {encoded['latents']} latents and {encoded['text']} captions; the rest came from "
             "the cache"]
    lines += [f"skipped {issue.path.name}: {issue.problem}" for issue in dataset.issues[:20]]
    if len(dataset.issues) > 20:
        lines.append(f"... and {len(dataset.issues) - 20} more issues")
    return "\n".join(lines)


class ZITDataset(io.ComfyNode):
    """Scan a folder of images + captions; encode it into the trainer's cache with the graph's VAE, CLIP."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZITDataset",
            display_name="ZIT Dataset (encode images + captions)",
            category=CATEGORY,
            description=(
                "Reads a folder of training images with same-name caption files (.txt), checks every image, "
                "sorts them into aspect buckets and encodes what the cache lacks: latents with the VAE, "
                "captions with the text encoder, both ComfyUI's own (loaded and freed by ComfyUI, in this "
                "prompt). The training job then never loads a VAE or text encoder. Unchanged images and "
                "captions are reused from <output>/zit-trainer/cache; editing the folder re-runs the node."),
            inputs=[
                io.String.Input("folder", default="zit_dataset", tooltip=(
                    "The image folder: a folder name inside ComfyUI's input folder (e.g. zit_dataset) or an "
                    "absolute path. Images: png, jpg, webp, bmp; captions: same name + caption_ext.")),
                io.Clip.Input("clip", tooltip=(
                    "The Z-Image text encoder (Load CLIP: qwen_3_4b.safetensors, type lumina2, or Load ZIT). "
                    "Captions are encoded as ComfyUI encodes prompts, padding removed.")),
                io.Vae.Input("vae", tooltip=(
                    "The Flux VAE (ae.safetensors). Load it with Load VAE or Load ZIT from a file so the "
                    "training job can decode its previews with it.")),
                io.String.Input("resolutions", default="1024", tooltip=(
                    "Training resolution(s), comma separated (e.g. 1024 or 512,768,1024): each image is "
                    "cropped to the aspect bucket of about side^2 pixels; multiples of 16, at least 64. "
                    "Images smaller than a resolution are not upscaled to it.")),
                io.String.Input("trigger", default="", tooltip=(
                    "Trigger word put in front of every caption ('trigger, caption'); empty = none.")),
                io.String.Input("caption", default="", multiline=True, tooltip=(
                    "One caption for every image, ignoring caption files; empty = each image's caption "
                    "file.")),
                io.Combo.Input("missing_caption", options=list(MISSING_CAPTION), default="error", tooltip=(
                    "An image without caption file: error (stop and list them), skip it, or train it on "
                    "the trigger word alone.")),
                io.String.Input("caption_ext", default=".txt", advanced=True, tooltip=(
                    "Extension of the caption files.")),
                io.Boolean.Input("recursive", default=False, advanced=True, tooltip=(
                    "Also read images in sub-folders.")),
                io.Int.Input("min_side", default=256, min=1, max=8192, advanced=True, tooltip=(
                    "Images whose shorter side is below this are skipped (or refused, see bad_image).")),
                io.Combo.Input("bad_image", options=list(BAD_IMAGE), default="skip", advanced=True, tooltip=(
                    "An unreadable, corrupt or too small image: skip it with a warning, or stop.")),
            ],
            outputs=[ZitDatasetType.Output(display_name="dataset", tooltip=(
                "The encoded dataset, for ZIT Train (the cache location and the encoders' identities)."))],
            search_aliases=["zit dataset", "lora dataset", "training images", "caption folder"],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs: Any) -> str:
        try:
            folder = resolve_folder(str(kwargs.get("folder") or ""))
        except ValueError:
            return "no folder"
        caption_ext = str(kwargs.get("caption_ext") or ".txt")
        return folder_fingerprint(folder, bool(kwargs.get("recursive")), caption_ext)

    @classmethod
    def execute(cls, folder: str, clip: Any, vae: Any, resolutions: str = "1024", trigger: str = "",
                caption: str = "", missing_caption: str = "error", caption_ext: str = ".txt",
                recursive: bool = False, min_side: int = 256, bad_image: str = "skip") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        from ..trainer.config import check_field
        from ..trainer.data import build_cache, load_dataset
        from ..trainer.model import TextEncoder

        if clip is None or vae is None:
            raise ValueError("connect a text encoder (clip) and a VAE: the dataset is encoded with them")
        path = resolve_folder(folder)
        data = {
            "dataset": str(path), "resolutions": list(parse_resolutions(resolutions)),
            "caption": caption.strip(), "trigger": trigger.strip(), "missing_caption": missing_caption,
            "caption_ext": check_field("data.caption_ext", caption_ext), "recursive": recursive,
            "min_side": min_side, "bad_image": bad_image, "cache_dir": str(work_root() / "cache"),
        }
        dataset = load_dataset(path, data["resolutions"], recursive=recursive,
                               caption=data["caption"] or None, trigger=data["trigger"] or None,
                               missing_caption=missing_caption, bad_image=bad_image, min_side=min_side,
                               caption_ext=data["caption_ext"])
        encode_image = image_encoder(vae)
        encode_text = text_encoder(clip, TextEncoder.max_length)
        vae_id, te_id = vae_identity(vae), text_identity(clip)
        bar = comfy.utils.ProgressBar(max(1, len(dataset.samples)))
        encoded = {"latents": 0, "text": 0}

        def progress(stage: str, done: int, total: int) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel between files
            encoded[stage] = done
            bar.update_absolute(done, total)

        cache = Path(data["cache_dir"])
        build_cache(dataset, cache, encode_image, encode_text, vae_id, te_id, progress=progress)
        result = ZitDataset(dataset, data, cache, vae_id, te_id, vae_file(vae), text_file(clip), encode_text)
        return io.NodeOutput(result, ui=ui.PreviewText(_summary(dataset, encoded)))

"""The encoding cache: content-addressed latent and text-embedding files, and the dataset read from them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_write
from .buckets import Bucket
from .pixels import PREPROCESS_ID, load_image
from .records import Dataset, DatasetError, Sample, digest
from .sampler import BatchPlan, BucketBatchSampler

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total), stage being "latents" or "text"."""


class LazyEncoder:
    """A callable that builds its encoder from a factory on the first call, so an unused one costs nothing."""

    def __init__(self, factory: Callable[[], Callable[..., Any]]) -> None:
        self._factory = factory
        self._encoder: Callable[..., Any] | None = None

    @property
    def built(self) -> bool:
        """Whether the factory has been called (and its encoder not released)."""
        return self._encoder is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._encoder is None:
            self._encoder = self._factory()
        return self._encoder(*args, **kwargs)

    def release(self) -> None:
        """Drop the built encoder (to free its memory); a later call builds it again."""
        self._encoder = None


def latent_key(image_sha256: str, vae_id: str, bucket: Bucket) -> str:
    """Cache key of a latent: the image bytes' hash, the VAE identity, the bucket and the preprocessing."""
    return digest("latent", PREPROCESS_ID, vae_id, f"{bucket[0]}x{bucket[1]}", image_sha256)


def text_key(caption: str, te_id: str) -> str:
    """Cache key of a text embedding: the caption text and the text-encoder identity."""
    return digest("text", te_id, hashlib.sha256(caption.encode("utf-8")).hexdigest())


def latent_path(cache_dir: Path, key: str) -> Path:
    """Where the latent with this key is stored."""
    return cache_dir / "latents" / f"{key}.safetensors"


def text_path(cache_dir: Path, key: str) -> Path:
    """Where the text embedding with this key is stored."""
    return cache_dir / "text" / f"{key}.safetensors"


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temp file in the same folder and an atomic rename."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def cache_entry_ok(path: Path, name: str) -> bool:
    """Whether a cache file exists, parses as safetensors and holds the tensor ``name``."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return name in handle.keys()
    except Exception:  # noqa: BLE001 - any unreadable cache file is a miss, to be rewritten
        return False


def _as_latent(output: Any, source: Path) -> torch.Tensor:
    """Check an encoder's latent (C,h,w) or (1,C,h,w) and return it as a CPU (C,h,w) tensor."""
    batched = isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[0] == 1
    if not isinstance(output, torch.Tensor) or not (output.ndim == 3 or batched):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DatasetError(f"image encoder returned {shape} for {source}; expected (C,h,w) or (1,C,h,w)")
    latent = output[0] if output.ndim == 4 else output
    if not torch.isfinite(latent).all():
        raise DatasetError(f"image encoder returned non-finite values for {source}")
    return latent.detach().to("cpu").contiguous()


def _as_embedding(output: Any, caption: str) -> torch.Tensor:
    """Check a text embedding (L, hidden) (a leading batch of 1 is dropped) and return it on the CPU."""
    if isinstance(output, torch.Tensor) and output.ndim == 3 and output.shape[0] == 1:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DatasetError(
            f"text encoder returned {shape} for caption {caption[:60]!r}; expected (L, hidden)"
        )
    if not torch.isfinite(output).all():
        raise DatasetError(f"text encoder returned non-finite values for caption {caption[:60]!r}")
    return output.detach().to("cpu").contiguous()


def _require_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(
            f"{name} must identify the model (a name or weights hash); it is part of the cache key"
        )


def _encode_latent(sample: Sample, encode_image: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """Read, check and encode one sample's image."""
    data = sample.image.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sample.image.sha256:
        raise DatasetError(f"{sample.image.path} changed since the dataset was scanned; scan it again")
    pixels = load_image(data, sample.bucket).unsqueeze(0)
    with torch.no_grad():
        return _as_latent(encode_image(pixels), sample.image.path)


def ensure_latents(
    samples: Sequence[Sample],
    cache_dir: Path,
    encode_image: Callable[[torch.Tensor], Any],
    vae_id: str,
    progress: Progress | None = None,
) -> list[Path]:
    """The latent cache file of each sample, encoding (1,3,H,W) [-1,1] pixels only for the missing ones."""
    _require_id("vae_id", vae_id)
    paths = [latent_path(cache_dir, latent_key(s.image.sha256, vae_id, s.bucket)) for s in samples]
    pairs = zip(paths, samples, strict=True)
    missing = {path: sample for path, sample in pairs if not cache_entry_ok(path, "latent")}
    for done, (path, sample) in enumerate(missing.items(), start=1):
        metadata = {"source": sample.image.path.name, "bucket": f"{sample.bucket[0]}x{sample.bucket[1]}"}
        save_atomic(path, {"latent": _encode_latent(sample, encode_image)}, metadata | {"vae_id": vae_id})
        if progress is not None:
            progress("latents", done, len(missing))
    return paths


def ensure_text(
    captions: Sequence[str],
    cache_dir: Path,
    encode_text: Callable[[list[str]], Sequence[Any]],
    te_id: str,
    progress: Progress | None = None,
    batch_size: int = 8,
) -> list[Path]:
    """The embedding cache file of each caption, encoding only the missing ones, ``batch_size`` at a time."""
    _require_id("te_id", te_id)
    paths = [text_path(cache_dir, text_key(caption, te_id)) for caption in captions]
    pairs = zip(paths, captions, strict=True)
    todo = list({path: caption for path, caption in pairs if not cache_entry_ok(path, "text")}.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        with torch.no_grad():
            outputs = list(encode_text([caption for _, caption in chunk]))
        if len(outputs) != len(chunk):
            raise DatasetError(f"text encoder returned {len(outputs)} embeddings for {len(chunk)} captions")
        for (path, caption), output in zip(chunk, outputs, strict=True):
            save_atomic(path, {"text": _as_embedding(output, caption)}, {"caption": caption, "te_id": te_id})
        if progress is not None:
            progress("text", start + len(chunk), len(todo))
    return paths


def cached_text_embeddings(
    prompts: Sequence[str],
    cache_dir: str | os.PathLike[str],
    encode_text: Callable[[list[str]], Sequence[Any]],
    te_id: str,
) -> list[torch.Tensor]:
    """Text embeddings (L, hidden) for prompts (e.g. preview prompts), through the same cache."""
    return [load_file(path)["text"] for path in ensure_text(prompts, Path(cache_dir), encode_text, te_id)]


@dataclass(frozen=True)
class CachedSample:
    """A sample with its cache files."""

    sample: Sample
    latent_file: Path
    text_file: Path


@dataclass
class Batch:
    """Tensors of one batch: latents (B,C,h,w), text embeddings (L_i, hidden) and what they came from."""

    latents: torch.Tensor
    text_embeds: list[torch.Tensor]
    captions: list[str]
    paths: list[Path]
    bucket: Bucket


class CachedDataset:
    """A dataset whose latents and text embeddings are all on disk; batches are read from the cache."""

    def __init__(self, entries: Sequence[CachedSample], empty_text_file: Path) -> None:
        self.entries = list(entries)
        self.empty_text_file = empty_text_file

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def buckets(self) -> list[Bucket]:
        """The bucket of each entry, in entry order."""
        return [entry.sample.bucket for entry in self.entries]

    def sampler(self, batch_size: int = 1, **options: Any) -> BucketBatchSampler:
        """A resumable batch sampler over this dataset's buckets; options as ``BucketBatchSampler``'s."""
        return BucketBatchSampler(self.buckets, batch_size, **options)

    def load_batch(self, plan: BatchPlan) -> Batch:
        """Read a planned batch; captions the plan drops get the empty-caption embedding and caption ""."""
        entries = [self.entries[i] for i in plan.indices]
        if len({entry.sample.bucket for entry in entries}) != 1:
            raise ValueError(f"batch plan {plan.indices} is empty or mixes buckets")
        dropped = list(zip(entries, plan.drop_caption, strict=True))
        return Batch(
            latents=torch.stack([load_file(entry.latent_file)["latent"] for entry in entries]),
            text_embeds=[
                load_file(self.empty_text_file if drop else e.text_file)["text"] for e, drop in dropped
            ],
            captions=["" if drop else e.sample.image.caption for e, drop in dropped],
            paths=[entry.sample.image.path for entry in entries],
            bucket=entries[0].sample.bucket,
        )


def build_cache(
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    encode_image: Callable[[torch.Tensor], Any],
    encode_text: Callable[[list[str]], Sequence[Any]],
    vae_id: str,
    te_id: str,
    progress: Progress | None = None,
) -> CachedDataset:
    """Encode what the cache lacks (latents, then captions and the empty caption) and return the dataset.

    ``encode_image`` takes (1,3,H,W) float32 pixels in [-1,1] and returns a latent (C,h,w) or (1,C,h,w);
    ``encode_text`` takes a list of captions and returns one (L, hidden) tensor each. An encoder is only
    called for cache misses: pass ``LazyEncoder(factory)`` and a warm cache never builds the model.
    Keys hash the image bytes (or caption), ``vae_id`` / ``te_id``, the bucket and the preprocessing, so
    any change to those is a miss and everything else is reused. Files are written atomically.
    """
    root = Path(cache_dir)
    latent_files = ensure_latents(dataset.samples, root, encode_image, vae_id, progress)
    captions = [sample.image.caption for sample in dataset.samples]
    *text_files, empty_file = ensure_text([*captions, ""], root, encode_text, te_id, progress)
    entries = [
        CachedSample(sample, latent, text)
        for sample, latent, text in zip(dataset.samples, latent_files, text_files, strict=True)
    ]
    return CachedDataset(entries, empty_file)


def encode_share(
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    encode_image: Callable[[torch.Tensor], Any],
    encode_text: Callable[[list[str]], Sequence[Any]],
    vae_id: str,
    te_id: str,
    rank: int,
    world: int,
    progress: Progress | None = None,
) -> None:
    """Process `rank` of `world` encodes its share of the cache misses (every world-th sample and caption;
    process 0 also the empty caption); after a barrier `build_cache` finds everything cached."""
    root = Path(cache_dir)
    ensure_latents(dataset.samples[rank::world], root, encode_image, vae_id, progress)
    captions = sorted({sample.image.caption for sample in dataset.samples})
    ensure_text(captions[rank::world] + ([""] if rank == 0 else []), root, encode_text, te_id, progress)

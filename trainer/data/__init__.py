"""Training data: scan a folder of images and captions, bucket by aspect ratio, cache encodings, draw batches.

The pipeline is three steps, each checkable on its own:

1. ``load_dataset(folder, resolutions, ...)`` (scan.py) opens, verifies and fully decodes every image up
   front, reads its caption and assigns it an aspect bucket (buckets.py) per target resolution. Every problem
   is collected as a ``DatasetIssue`` naming the file (records.py); policies decide whether it is skipped or
   raised as one ``DatasetError`` listing them all, so a run never dies on image 731.
2. ``build_cache(dataset, cache_dir, encode_image, encode_text, vae_id, te_id)`` (cache.py) encodes only the
   latents (pixels.py preprocessing) and text embeddings missing from the on-disk cache (content-addressed
   safetensors files) and returns a ``CachedDataset``. Wrap encoder factories in ``LazyEncoder`` and a warm
   cache never builds them.
3. ``CachedDataset.sampler(...)`` gives a ``BucketBatchSampler`` (sampler.py): batches within one bucket, an
   order fixed by (seed, epoch), caption dropout decided in the plan, and a state_dict for exact resumption;
   ``CachedDataset.load_batch(plan)`` turns a plan into tensors.

This package knows no model: encoders come in as callables and model identities as strings.
"""

from .buckets import SIDE_MULTIPLE, Bucket, cover_scale, make_buckets, nearest_bucket
from .cache import (
    Batch,
    CachedDataset,
    CachedSample,
    LazyEncoder,
    Progress,
    build_cache,
    cache_entry_ok,
    cached_text_embeddings,
    encode_share,
    ensure_latents,
    ensure_text,
    latent_key,
    latent_path,
    save_atomic,
    text_key,
    text_path,
)
from .pixels import PREPROCESS_ID, fit_to_bucket, load_image
from .records import Dataset, DatasetError, DatasetIssue, ImageRecord, Sample
from .sampler import BatchPlan, BucketBatchSampler
from .scan import (
    BAD_IMAGE_POLICIES,
    IMAGE_EXTENSIONS,
    MISSING_CAPTION_POLICIES,
    compose_caption,
    inspect_image,
    list_images,
    load_dataset,
    read_caption,
    samples_for,
    scan_images,
)

__all__ = [
    "BAD_IMAGE_POLICIES",
    "IMAGE_EXTENSIONS",
    "MISSING_CAPTION_POLICIES",
    "PREPROCESS_ID",
    "SIDE_MULTIPLE",
    "Batch",
    "BatchPlan",
    "Bucket",
    "BucketBatchSampler",
    "CachedDataset",
    "CachedSample",
    "Dataset",
    "DatasetError",
    "DatasetIssue",
    "ImageRecord",
    "LazyEncoder",
    "Progress",
    "Sample",
    "build_cache",
    "cache_entry_ok",
    "cached_text_embeddings",
    "compose_caption",
    "cover_scale",
    "encode_share",
    "ensure_latents",
    "ensure_text",
    "fit_to_bucket",
    "inspect_image",
    "latent_key",
    "latent_path",
    "list_images",
    "load_dataset",
    "load_image",
    "make_buckets",
    "nearest_bucket",
    "read_caption",
    "samples_for",
    "save_atomic",
    "scan_images",
    "text_key",
    "text_path",
]

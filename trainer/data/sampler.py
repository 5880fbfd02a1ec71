"""Batch sampling: bucket-pure batches in an order fixed by (seed, epoch), resumable at any batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .buckets import Bucket
from .records import DatasetError, digest


@dataclass(frozen=True)
class BatchPlan:
    """Which entries form a batch (all in one bucket), and whose captions are dropped."""

    epoch: int
    index: int
    indices: tuple[int, ...]
    drop_caption: tuple[bool, ...]


class BucketBatchSampler:
    """Batches that never mix buckets, in an order fixed by (seed, epoch), resumable at any batch.

    An epoch: in each bucket (in sorted order) the members are shuffled once per repeat and the
    ``repeats`` shuffles concatenated (so an image meets itself in a batch only at a repeat seam), cut
    into batches (the last partial one kept unless ``drop_last``); then all batches are shuffled and
    each caption is dropped with probability ``caption_dropout``. Everything comes from a numpy
    generator seeded with (seed, epoch), so the plan of any epoch can be recomputed after a restart.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int = 1,
        *,
        seed: int = 0,
        repeats: int = 1,
        drop_last: bool = False,
        caption_dropout: float = 0.0,
        shuffle: bool = True,
    ) -> None:
        _check_sampler_options(batch_size, repeats, caption_dropout)
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats
        self.drop_last, self.caption_dropout, self.shuffle = drop_last, caption_dropout, shuffle
        self._groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self._groups.setdefault(tuple(bucket), []).append(index)
        self._groups = dict(sorted(self._groups.items()))
        self._num_samples = len(buckets)
        self.epoch, self.index = 0, 0
        self._plan: tuple[int, list[BatchPlan]] | None = None
        if len(self) == 0:
            raise DatasetError(
                f"no batches: with drop_last every bucket has fewer than batch_size={batch_size} samples "
                f"(bucket sizes {[len(g) * repeats for g in self._groups.values()]})"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(len(group) * self.repeats / self.batch_size) for group in self._groups.values())

    def fingerprint(self) -> str:
        """A hash of the data layout and settings; a saved state only fits a sampler with the same one."""
        layout = repr((self._num_samples, list(self._groups.items())))
        settings = (
            self.batch_size,
            self.seed,
            self.repeats,
            self.drop_last,
            self.caption_dropout,
            self.shuffle,
        )
        return digest(layout, repr(settings))[:16]

    def plan_epoch(self, epoch: int) -> list[BatchPlan]:
        """All batches of an epoch, in order; a pure function of the settings and the epoch."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        chunks: list[list[int]] = []
        for group in self._groups.values():
            rounds = [rng.permutation(group) if self.shuffle else group for _ in range(self.repeats)]
            order = [int(i) for members in rounds for i in members]
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    chunks.append(chunk)
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        drops = [rng.random(len(chunk)) < self.caption_dropout for chunk in chunks]
        return [
            BatchPlan(epoch, i, tuple(chunk), tuple(bool(d) for d in drop))
            for i, (chunk, drop) in enumerate(zip(chunks, drops, strict=True))
        ]

    def _epoch_plan(self, epoch: int) -> list[BatchPlan]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.plan_epoch(epoch))
        return self._plan[1]

    def next_batch(self) -> BatchPlan:
        """The next batch plan, moving on to the next epoch after the last batch of this one."""
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        plan = self._epoch_plan(self.epoch)[self.index]
        self.index += 1
        return plan

    def __iter__(self) -> Iterator[BatchPlan]:
        """Endless batch plans from the current position (stop by step count)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches already drawn in it) and the fingerprint it belongs to."""
        return {"epoch": self.epoch, "index": self.index, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position; strict refuses a state of other data or settings, else the index is clamped."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if strict and state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "sampler state was saved with different data or sampler settings "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint()}); resume with strict=False "
                "to continue in a new order"
            )
        if strict and not 0 <= index <= len(self):
            raise ValueError(f"sampler index {index} outside 0..{len(self)}")
        self.epoch, self.index = max(epoch, 0), min(max(index, 0), len(self))


def _check_sampler_options(batch_size: int, repeats: int, caption_dropout: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")

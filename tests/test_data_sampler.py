"""The resumable bucket batch sampler (trainer.data.sampler): batches never mix buckets and cover each
sample, drop_last and repeats, order from seed and epoch, state restore, caption dropout and option checks.
"""

from __future__ import annotations

from collections import Counter

import pytest

from trainer import data as D

BUCKETS = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)] * 1


def flatten(plans: list[D.BatchPlan]) -> list[int]:
    return [i for plan in plans for i in plan.indices]


def test_batches_never_mix_buckets_and_cover_each_sample() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=3)
    plans = sampler.plan_epoch(0)
    assert len(plans) == len(sampler) == 3 + 2 + 1
    for plan in plans:
        assert len({BUCKETS[i] for i in plan.indices}) == 1
    assert sorted(flatten(plans)) == list(range(len(BUCKETS)))


def test_drop_last_and_repeats() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=0, repeats=3, drop_last=True)
    plans = sampler.plan_epoch(0)
    assert all(len(p.indices) == 2 for p in plans)
    assert len(plans) == len(sampler) == 15 // 2 + 9 // 2 + 3 // 2
    kept = D.BucketBatchSampler(BUCKETS, 2, seed=0, repeats=3)
    assert Counter(flatten(kept.plan_epoch(0))) == {i: 3 for i in range(len(BUCKETS))}
    with pytest.raises(D.DatasetError, match="batch_size=8"):
        D.BucketBatchSampler(BUCKETS, 8, drop_last=True)


def test_repeats_never_pair_an_image_with_itself_inside_a_round() -> None:
    sampler = D.BucketBatchSampler([(64, 64)] * 6, 3, seed=1, repeats=4)
    for plan in sampler.plan_epoch(0):
        assert len(set(plan.indices)) == 3


def test_order_deterministic_from_seed_and_epoch() -> None:
    a = D.BucketBatchSampler(BUCKETS, 2, seed=7)
    b = D.BucketBatchSampler(BUCKETS, 2, seed=7)
    c = D.BucketBatchSampler(BUCKETS, 2, seed=8)
    assert a.plan_epoch(0) == b.plan_epoch(0)
    assert a.plan_epoch(0) != c.plan_epoch(0)
    assert a.plan_epoch(0) != a.plan_epoch(1)
    ordered = D.BucketBatchSampler(BUCKETS, 2, shuffle=False)
    assert flatten(ordered.plan_epoch(0)) == [8, 0, 1, 2, 3, 4, 5, 6, 7]  # buckets in sorted order


def test_state_restore_gives_same_continuation() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=5, repeats=2, caption_dropout=0.3)
    for _ in range(9):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(20)]
    resumed = D.BucketBatchSampler(BUCKETS, 2, seed=5, repeats=2, caption_dropout=0.3)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_batch() for _ in range(20)] == expected
    assert expected[-1].epoch >= 2


def test_state_from_other_settings_refused_unless_not_strict() -> None:
    state = D.BucketBatchSampler(BUCKETS, 2, seed=5).state_dict() | {"index": 4}
    other = D.BucketBatchSampler(BUCKETS[:-1], 2, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)
    other.load_state_dict(state | {"index": 99}, strict=False)
    assert other.index == len(other)
    other.next_batch()
    assert (other.epoch, other.index) == (1, 1)


def test_caption_dropout_rate() -> None:
    sampler = D.BucketBatchSampler([(64, 64)] * 100, 4, seed=2, caption_dropout=0.25)
    drops = [d for epoch in range(10) for plan in sampler.plan_epoch(epoch) for d in plan.drop_caption]
    assert sum(drops) / len(drops) == pytest.approx(0.25, abs=0.03)
    assert not any(d for p in D.BucketBatchSampler(BUCKETS, 2).plan_epoch(0) for d in p.drop_caption)


def test_sampler_options_validated() -> None:
    for kw in ({"batch_size": 0}, {"repeats": 0}, {"caption_dropout": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            D.BucketBatchSampler(BUCKETS, **kw)  # type: ignore[arg-type]

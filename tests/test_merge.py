"""Exact and SVD merges: the dW identity, block/component weights, partial overlap, SVD truncation bounds."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.lora.blocks import BlockWeights, resolve
from trainer.lora.canonical import Lora, LoraError, LoraModule
from trainer.lora.merge import factor_svd, factor_svdvals, merge_exact, merge_recipe, merge_svd
from trainer.lora.spec import BASE, ZIT, ZitSpec
from trainer.lora.synth import random_lora

Q, W1, ADALN, OUT = ("L00", "q"), ("L05", "w1"), ("L12", "adaLN"), ("CR0", "out")
EMB = (BASE, "cap_embedder.1")


def assert_near(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """max |got - want| <= rel * max |want| (cheaper than assert_close on 40M-element matrices)."""
    assert got.shape == want.shape
    err, scale = float((got.to(want.dtype) - want).abs().max()), float(want.abs().max())
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def weighted_sum(items, key, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference: sum_i w_i dW_i from explicit deltas."""
    total = None
    for lora, w in items:
        if key in lora.modules:
            d = lora.modules[key].delta().to(dtype) * w.weight(key)
            total = d if total is None else total + d
    return total


def weighted_sum_nonzero(items, key) -> torch.Tensor | None:
    """The reference over the inputs with a non-zero weight (None when there are none)."""
    return weighted_sum([(lora, w) for lora, w in items if w.weight(key) != 0], key)


def fixed_spectrum(s: list[float], key=ADALN, spec: ZitSpec = ZIT, seed: int = 0) -> Lora:
    """A one-module LoRA whose dW has exactly the singular values `s` (orthonormal U, V)."""
    out_f, in_f = spec.shape(key)
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, len(s), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_f, len(s), generator=gen, dtype=torch.float64))[0]
    sv = torch.tensor(s, dtype=torch.float64)
    return Lora({key: LoraModule(v.T.float().contiguous(), (u * sv).float())}, {}, spec)


@pytest.fixture(scope="module")
def three() -> list[tuple[Lora, BlockWeights]]:
    x = random_lora(4, keys=[Q, W1, ADALN, EMB], seed=1)
    y = random_lora(8, keys=[Q, OUT, ADALN], seed=2)
    z = random_lora(2, keys=[Q, W1, OUT], seed=3)
    x.metadata["zit.name"] = "style"
    return [
        (x, resolve("L05=0.5,BASE=2", "q=0.25", ratio=0.8)),
        (y, resolve("late", "", ratio=-0.5)),  # late: L12 (adaLN) weight 0 -> y adds nothing there
        (z, resolve("all", "w1=0", ratio=1.5)),
    ]


# ---- exact ---------------------------------------------------------------------------------------------


def test_exact_merge_equals_weighted_sum_of_deltas(three) -> None:
    merged = merge_exact(three)
    assert list(merged.modules) == [Q, W1, ADALN, OUT, EMB]  # spec order, BASE last
    for key, m in merged.modules.items():
        assert_near(m.delta(), weighted_sum(three, key, torch.float32))


def test_exact_merge_rank_is_sum_of_contributing_ranks(three) -> None:
    merged = merge_exact(three)
    ranks = {key: m.rank for key, m in merged.modules.items()}
    # Q: x and z (4 + 2; y's L00 is 0 under "late"); W1: x only (z has w1=0); ADALN: x only (L12 is 0
    # under "late"); OUT: y and z (CR0 is 1 under "late"); EMB: x (BASE=2, components don't apply)
    assert ranks == {Q: 6, W1: 4, ADALN: 4, OUT: 10, EMB: 4}


def test_exact_merge_drops_modules_nobody_contributes_to() -> None:
    x = random_lora(2, keys=[Q, OUT], seed=4)
    merged = merge_exact([(x, resolve("R=0"))])
    assert list(merged.modules) == [Q]


def test_exact_merge_recipe(three) -> None:
    recipe = merge_recipe(merge_exact(three))
    assert recipe["method"] == "exact"
    assert [i["name"] for i in recipe["inputs"]] == ["style", None, None]
    assert [i["ratio"] for i in recipe["inputs"]] == [0.8, -0.5, 1.5]
    assert [i["rank"] for i in recipe["inputs"]] == [4, 8, 2]
    assert recipe["inputs"][1]["blocks"] == resolve("late").vector_string()
    assert recipe["inputs"][2]["components"] == "adaLN=1,q=1,k=1,v=1,out=1,w1=0,w2=1,w3=1"
    assert merge_recipe(random_lora(1, keys=[Q])) is None


def test_exact_merge_dtypes() -> None:
    x = random_lora(2, keys=[Q], seed=5, dtype=torch.bfloat16)
    y = random_lora(2, keys=[Q], seed=6)
    merged = merge_exact([(x, BlockWeights()), (y, BlockWeights())])
    assert {m.a.dtype for m in merged.modules.values()} == {torch.bfloat16}
    assert torch.equal(merged.modules[Q].a[:2], x.modules[Q].a)  # bf16 -> fp32 -> bf16 is exact
    half = merge_exact([(x, BlockWeights()), (y, BlockWeights())], dtype=torch.float16)
    assert half.modules[Q].b.dtype == torch.float16


def test_merge_refuses_mixed_specs_and_shapes() -> None:
    small = ZitSpec(dim=32, n_layers=2, n_heads=2, cap_feat_dim=16)
    x, y = random_lora(2, keys=[Q], seed=1), random_lora(2, spec=small, keys=[Q], seed=2)
    with pytest.raises(LoraError, match="input 2"):
        merge_exact([(x, BlockWeights()), (y, BlockWeights())])
    bad = Lora({Q: LoraModule(torch.zeros(2, 3840), torch.zeros(100, 2))})
    with pytest.raises(LoraError, match="L00.q .*input 2"):
        merge_exact([(x, BlockWeights()), (bad, BlockWeights())])
    with pytest.raises(LoraError, match="no inputs"):
        merge_exact([])


TINY = ZitSpec(dim=32, n_layers=3, n_heads=2, cap_feat_dim=16)
TINY_KEYS = TINY.module_keys()
weights_st = st.builds(
    lambda vec, comps, ratio: BlockWeights(tuple(vec), comps, ratio),
    st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 0.3]), min_size=35, max_size=35),
    st.dictionaries(st.sampled_from(["adaLN", "q", "k", "v", "out", "w1", "w2", "w3"]),
                    st.sampled_from([0.0, 2.0, 0.5])),
    st.floats(-2, 2, allow_nan=False),
)
input_st = st.tuples(st.integers(1, 4), st.sets(st.sampled_from(TINY_KEYS), min_size=1, max_size=12),
                     st.integers(0, 10_000), weights_st)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(input_st, min_size=1, max_size=4))
def test_exact_merge_identity_property(inputs) -> None:
    items = [(random_lora(r, spec=TINY, keys=sorted(keys), seed=seed), w) for r, keys, seed, w in inputs]
    merged = merge_exact(items)
    for key in {k for lora, _ in items for k in lora.modules}:
        want = weighted_sum_nonzero(items, key)
        if want is None:
            assert key not in merged.modules
        else:
            torch.testing.assert_close(merged.modules[key].delta().double(), want, rtol=1e-5, atol=1e-9)


# ---- SVD -----------------------------------------------------------------------------------------------


def test_factor_svd_reconstructs_and_matches_svdvals() -> None:
    m = random_lora(6, keys=[ADALN], seed=7).modules[ADALN]
    u, s, vh = factor_svd(m.b, m.a)
    dw = m.b.double() @ m.a.double()
    assert_near(u @ torch.diag(s) @ vh, dw, rel=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(factor_svdvals(m.b, m.a), torch.linalg.svdvals(dw)[:6])


def test_svd_singular_values_match_explicit_dw() -> None:
    # ADALN (15360 x 256) is moderately sized: an explicit SVD of it is cheap
    items = [(random_lora(6, keys=[ADALN], seed=8), resolve(ratio=0.7)),
             (random_lora(10, keys=[ADALN], seed=9), resolve("L12=-1.5"))]
    exact = merge_exact(items).modules[ADALN]
    want = torch.linalg.svdvals(weighted_sum(items, ADALN))[:16]
    torch.testing.assert_close(factor_svdvals(exact.b, exact.a), want, rtol=1e-5, atol=1e-9)
    merged, _ = merge_svd(items, rank=16, dtype=torch.float64)
    got = merged.modules[ADALN]
    torch.testing.assert_close(factor_svdvals(got.b, got.a), want, rtol=1e-5, atol=1e-9)


def test_svd_error_is_eckart_young(three) -> None:
    merged, reports = merge_svd(three, rank=5)
    report = reports[OUT]
    assert (report.rank, report.input_rank) == (5, 10)
    dw = weighted_sum(three, OUT)
    err = torch.linalg.matrix_norm(dw - merged.modules[OUT].delta().double()) / torch.linalg.matrix_norm(dw)
    assert float(err) == pytest.approx(report.rel_error, rel=1e-4)
    exact = merge_exact(three).modules[OUT]
    s = factor_svdvals(exact.b, exact.a)  # checked against an explicit SVD on ADALN above
    discarded = float(s[5:].square().sum() / s.square().sum())
    assert report.rel_error == pytest.approx(discarded**0.5, rel=1e-6)
    assert report.energy == pytest.approx(1 - discarded, rel=1e-9)
    # any other rank-5 approximation does no better: here, the first 5 concatenated factors
    other = exact.b[:, :5].double() @ exact.a[:5].double()
    assert float(torch.linalg.matrix_norm(dw - other) / torch.linalg.matrix_norm(dw)) >= report.rel_error


def test_svd_with_full_rank_reproduces_the_exact_merge(three) -> None:
    exact = merge_exact(three)
    merged, reports = merge_svd(three, rank=1000)
    for key, m in merged.modules.items():
        assert m.rank == exact.modules[key].rank == reports[key].input_rank
        assert reports[key].rel_error < 1e-6 and reports[key].energy == pytest.approx(1.0)
        assert_near(m.delta(), exact.modules[key].delta())
    assert merge_recipe(merged)["method"] == "svd" and merge_recipe(merged)["rank"] == 1000


SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]  # squared: 64, 16, 4, 1, .25, .0625 of 85.3125


@pytest.mark.parametrize(("energy", "k"), [(0.5, 1), (0.75, 1), (0.76, 2), (0.95, 3), (0.999, 5), (1.0, 6)])
def test_svd_energy_threshold(energy: float, k: int) -> None:
    lora = fixed_spectrum(SPECTRUM)
    merged, reports = merge_svd([(lora, BlockWeights())], energy=energy)
    report = reports[ADALN]
    assert report.rank == merged.modules[ADALN].rank == k
    assert report.energy >= energy
    sq = torch.tensor(SPECTRUM).square()
    assert float(sq[: k - 1].sum() / sq.sum()) < energy  # k is the least rank that keeps enough
    assert report.rel_error == pytest.approx((1 - report.energy) ** 0.5, abs=1e-7)


def test_svd_rank_and_energy_take_the_smaller() -> None:
    lora = fixed_spectrum(SPECTRUM)
    assert merge_svd([(lora, BlockWeights())], rank=2, energy=0.999)[1][ADALN].rank == 2
    assert merge_svd([(lora, BlockWeights())], rank=4, energy=0.5)[1][ADALN].rank == 1


def test_svd_splits_singular_values_evenly() -> None:
    merged, _ = merge_svd([(fixed_spectrum(SPECTRUM), BlockWeights())], rank=3)
    m = merged.modules[ADALN]
    root = torch.tensor(SPECTRUM[:3]).sqrt()
    torch.testing.assert_close(m.b.norm(dim=0), root, rtol=1e-5, atol=0)
    torch.testing.assert_close(m.a.norm(dim=1), root, rtol=1e-5, atol=0)


def test_svd_of_a_zero_module() -> None:
    zero = Lora({Q: LoraModule(torch.randn(4, 3840), torch.zeros(3840, 4))})
    merged, reports = merge_svd([(zero, BlockWeights())], energy=0.9)
    assert reports[Q].rank == 1 and reports[Q].energy == 1.0 and reports[Q].rel_error == 0.0
    assert float(merged.modules[Q].b.abs().max()) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [({}, "target rank"), ({"rank": 0}, "at least 1"), ({"energy": 0.0}, r"\(0, 1\]"),
     ({"energy": 1.5}, "1.5")],
)
def test_svd_target_errors(kwargs: dict, why: str) -> None:
    with pytest.raises(LoraError, match=why):
        merge_svd([(random_lora(1, keys=[Q]), BlockWeights())], **kwargs)


def test_recipe_is_json(three) -> None:
    merged, _ = merge_svd(three, energy=0.9)
    assert json.loads(merged.metadata["zit.merge"])["energy"] == 0.9

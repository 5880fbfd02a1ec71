"""Block vectors, range syntax, presets, component multipliers and apply_weights."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.errors import ZitError
from trainer.lora.blocks import (
    PRESETS,
    BlockWeightError,
    BlockWeights,
    apply_weights,
    format_number,
    parse_blocks,
    parse_components,
    recorded_weights,
    resolve,
)
from trainer.lora.spec import BASE, COMPONENTS, VECTOR_BLOCKS
from trainer.lora.synth import random_lora

finite = st.floats(allow_nan=False, allow_infinity=False)
weight_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0]), finite)


@given(st.lists(finite, min_size=35, max_size=35))
def test_vector_string_round_trips(values: list[float]) -> None:
    text = BlockWeights(tuple(values)).vector_string()
    assert parse_blocks(text) == tuple(values)
    assert " " not in text and text.count(",") == 34


@given(finite)
def test_format_number_is_exact_and_compact(x: float) -> None:
    text = format_number(x)
    assert float(text) == x
    if x.is_integer() and abs(x) < 1e15:
        assert "." not in text and "e" not in text


def test_format_number_examples() -> None:
    got = [format_number(x) for x in (1.0, 0.5, 0.0, -0.0, -2.0, 1e-5)]
    assert got == ["1", "0.5", "0", "0", "-2", "1e-05"]


# ---- fill rules ---------------------------------------------------------------------------------------


def _distinct(n: int) -> list[float]:
    return [float(i + 2) for i in range(n)]


def test_fill_one_value_sets_every_block() -> None:
    assert parse_blocks("0.25") == (0.25,) * 35


def test_fill_30_is_main_layers() -> None:
    v = _distinct(30)
    assert parse_blocks(",".join(map(str, v))) == (1.0, *v, 1.0, 1.0, 1.0, 1.0)


def test_fill_31_is_base_and_main_layers() -> None:
    v = _distinct(31)
    assert parse_blocks(",".join(map(str, v))) == (*v, 1.0, 1.0, 1.0, 1.0)


def test_fill_34_is_main_layers_and_refiners() -> None:
    v = _distinct(34)
    assert parse_blocks(",".join(map(str, v))) == (1.0, *v)


def test_fill_35_is_the_full_vector() -> None:
    v = _distinct(35)
    assert parse_blocks(" , ".join(map(str, v))) == tuple(v)


@pytest.mark.parametrize("n", [2, 29, 32, 33, 36])
def test_other_lengths_are_refused_with_the_accepted_lengths(n: int) -> None:
    with pytest.raises(BlockWeightError) as err:
        parse_blocks(",".join(["1"] * n))
    msg = str(err.value)
    assert f"got {n} values" in msg
    for accepted in ("1 (", "30 (", "31 (", "34 (", "35 ("):
        assert accepted in msg


def test_empty_text_is_all_ones() -> None:
    assert parse_blocks("  ") == (1.0,) * 35


# ---- range syntax ---------------------------------------------------------------------------------------


def test_range_examples() -> None:
    got = parse_blocks("%default=0, L10-19=0.5, nr1=2, BASE=3")
    assert got[0] == 3
    assert got[1:11] == (0.0,) * 10
    assert got[11:21] == (0.5,) * 10
    assert got[31:] == (0.0, 2.0, 0.0, 0.0)


def test_default_fills_only_blocks_not_named_wherever_it_is_written() -> None:
    assert parse_blocks("L07=0.5,default=0") == parse_blocks("%default=0,L07=0.5")
    assert parse_blocks("L07=0.5,default=0")[8] == 0.5


def test_later_assignment_wins() -> None:
    got = parse_blocks("L=0,L05-L06=1,L06=0.25,R=2,CR1=3")
    assert got[6:8] == (1.0, 0.25)
    assert got[31:] == (2.0, 2.0, 2.0, 3.0)


# A target is (text form, predicate on the vector index); the reference applies them element by element.
def _main(i: int) -> tuple[str, object]:
    return (f"L{i:02d}", lambda j: j == i + 1)


targets = st.one_of(
    st.just(("BASE", lambda j: j == 0)),
    st.just(("L", lambda j: 1 <= j <= 30)),
    st.just(("NR", lambda j: j in (31, 32))),
    st.just(("CR", lambda j: j in (33, 34))),
    st.just(("R", lambda j: j >= 31)),
    st.integers(0, 29).map(_main),
    st.integers(0, 29).map(lambda i: (f"L{i}", lambda j: j == i + 1)),
    st.tuples(st.integers(0, 29), st.integers(0, 29)).map(sorted).map(
        lambda r: (f"L{r[0]:02d}-{r[1]}", lambda j: r[0] + 1 <= j <= r[1] + 1)
    ),
    st.integers(0, 1).map(lambda i: (f"NR{i}", lambda j: j == 31 + i)),
    st.integers(0, 1).map(lambda i: (f"CR{i}", lambda j: j == 33 + i)),
)


@settings(max_examples=150)
@given(
    st.lists(st.tuples(targets, weight_values, st.booleans()), min_size=1, max_size=8),
    st.one_of(st.none(), weight_values),
    st.integers(0, 8),
)
def test_range_syntax_matches_element_by_element_reference(assignments, default, default_at) -> None:
    tokens = []
    for (name, _), value, lower in assignments:
        tokens.append(f" {name.lower() if lower else name} = {format_number(value)} ")
    if default is not None:
        tokens.insert(min(default_at, len(tokens)), f"%default={format_number(default)}")
    got = parse_blocks(",".join(tokens))
    base = 1.0 if default is None else default
    for j in range(35):
        want = base
        for (_, covers), value, _ in assignments:
            if covers(j):
                want = value
        assert got[j] == want, (VECTOR_BLOCKS[j], tokens)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "token", "why"),
    [
        ("L=abc", "L=abc", "not a number"),
        ("L=nan", "L=nan", "not a number"),
        ("L07=1e999", "L07=1e999", "out of range"),
        ("X7=1", "X7=1", "unknown block"),
        ("L19-10=1", "L19-10=1", "reversed range"),
        ("L30=1", "L30=1", "out of 0..29"),
        ("L25-30=0", "L25-30=0", "out of 0..29"),
        ("NR2=1", "NR2=1", "out of 0..1"),
        ("L=1,0.5", "0.5", "not an assignment"),
        ("1,L07", "L07", "not a number"),
        ("1,2", "", "accepted lengths"),
        ("1,,1", "1,,1", "empty"),
    ],
)
def test_block_errors_quote_the_token(text: str, token: str, why: str) -> None:
    with pytest.raises(BlockWeightError) as err:
        parse_blocks(text)
    assert why in str(err.value)
    if why != "accepted lengths":
        assert repr(token) in str(err.value)


def test_block_weight_error_is_a_zit_value_error() -> None:
    assert issubclass(BlockWeightError, ZitError) and issubclass(BlockWeightError, ValueError)


# ---- components -------------------------------------------------------------------------------------------


def test_components_unlisted_are_one() -> None:
    got = parse_components("adaLN=0, Q=0.5")
    assert got == {"adaLN": 0.0, "q": 0.5, "k": 1.0, "v": 1.0, "out": 1.0, "w1": 1.0, "w2": 1.0, "w3": 1.0}
    assert list(got) == list(COMPONENTS)


def test_component_groups_and_default() -> None:
    got = parse_components("attn=0.5,ffn=2,default=0,k=3")
    assert got == {"adaLN": 0.0, "q": 0.5, "k": 3.0, "v": 0.5, "out": 0.5, "w1": 2.0, "w2": 2.0, "w3": 2.0}
    assert parse_components("qkv=0")["out"] == 1.0


@pytest.mark.parametrize(
    ("text", "token", "why"),
    [("qq=1", "qq=1", "unknown component"), ("q=x", "q=x", "not a number"), ("q", "q", "not an assignment")],
)
def test_component_errors_quote_the_token(text: str, token: str, why: str) -> None:
    with pytest.raises(BlockWeightError) as err:
        parse_components(text)
    assert why in str(err.value) and repr(token) in str(err.value)


@given(st.dictionaries(st.sampled_from(COMPONENTS), weight_values))
def test_components_string_round_trips(values: dict[str, float]) -> None:
    w = BlockWeights(components=values)
    assert parse_components(w.components_string()) == w.components


# ---- BlockWeights, presets, resolve -------------------------------------------------------------------


def test_weight_is_ratio_block_component() -> None:
    w = resolve("L03=0.5,BASE=0.25", "q=0.2", ratio=2.0)
    assert math.isclose(w.weight(("L03", "q")), 2.0 * 0.5 * 0.2)
    assert w.weight(("L03", "k")) == 1.0
    assert w.weight(("L04", "q")) == pytest.approx(0.4)
    assert w.weight((BASE, "cap_embedder.1")) == 0.5  # components never apply to BASE modules


def test_weight_refuses_blocks_outside_the_vector() -> None:
    with pytest.raises(BlockWeightError, match="NR2"):
        BlockWeights().weight(("NR2", "q"))


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"blocks": (1.0,) * 34}, "need 35"),
        ({"components": {"qkv": 1.0}}, "unknown component"),
        ({"ratio": math.inf}, "finite"),
    ],
)
def test_block_weights_validation(kwargs: dict, why: str) -> None:
    with pytest.raises(BlockWeightError, match=why):
        BlockWeights(**kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves(name: str) -> None:
    w = resolve(name)
    assert len(w.blocks) == 35
    assert resolve(name.upper()) == w


def test_preset_meanings() -> None:
    early, late = resolve("early"), resolve("late")
    assert early.blocks[1:11] == (1.0,) * 10 and early.blocks[11:31] == (0.0,) * 20
    assert late.blocks[21:31] == (1.0,) * 10 and late.blocks[1:21] == (0.0,) * 20
    assert resolve("middle").blocks[11:21] == (1.0,) * 10
    assert resolve("none").blocks == (0.0,) * 35
    assert resolve("refiners-off").blocks[31:] == (0.0,) * 4 and resolve("refiners-off").blocks[0] == 1.0
    assert resolve("main-only").blocks[0] == 0.0 and resolve("main-only").blocks[31:] == (0.0,) * 4
    assert resolve("no-late").blocks[21:31] == (0.0,) * 10 and resolve("no-late").blocks[1:21] == (1.0,) * 20
    att = resolve("attention-only")
    assert [att.weight(("L00", c)) for c in COMPONENTS] == [0, 1, 1, 1, 1, 0, 0, 0]
    assert att.weight((BASE, "t_embedder.mlp.0")) == 0.0
    ffn = resolve("ffn-only")
    assert [ffn.weight(("L00", c)) for c in COMPONENTS] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert resolve("no-adaLN").components["adaLN"] == 0.0


def test_preset_components_multiply_explicit_components() -> None:
    w = resolve("attention-only", "q=0.5,w1=3")
    assert w.components["q"] == 0.5 and w.components["w1"] == 0.0 and w.components["k"] == 1.0


def test_resolve_round_trips_through_its_strings() -> None:
    w = resolve("late", "adaLN=0.5", ratio=0.75)
    assert resolve(w.vector_string(), w.components_string(), w.ratio) == w


# ---- apply_weights --------------------------------------------------------------------------------------

KEYS = [("L00", "q"), ("L00", "adaLN"), ("L15", "w2"), ("CR1", "out"), (BASE, "t_embedder.mlp.0")]


def test_apply_weights_scales_b_and_drops_zero_modules() -> None:
    lora = random_lora(rank=2, keys=KEYS, dtype=torch.bfloat16)
    w = resolve("L15=0.5,CR1=0,BASE=2", "adaLN=0", ratio=0.5)
    out = apply_weights(lora, w)
    assert set(out.modules) == {("L00", "q"), ("L15", "w2"), (BASE, "t_embedder.mlp.0")}
    for key, m in out.modules.items():
        src = lora.modules[key]
        assert m.b.dtype == torch.bfloat16 and m.a is src.a
        want = (src.b.float() * w.weight(key)).to(torch.bfloat16)
        assert torch.equal(m.b, want)
    assert out.metadata["zit.blocks"] == w.vector_string()
    assert out.metadata["zit.components"] == "adaLN=0,q=1,k=1,v=1,out=1,w1=1,w2=1,w3=1"
    assert out.metadata["zit.ratio"] == "0.5"
    assert lora.metadata == {} and len(lora) == len(KEYS)


def test_apply_weights_twice_records_the_combined_weights() -> None:
    lora = random_lora(rank=2, keys=KEYS[:3])
    first, second = resolve("L=0.5", "q=2"), resolve("L00=0.5", "", ratio=3.0)
    out = apply_weights(apply_weights(lora, first), second)
    recorded = recorded_weights(out)
    assert recorded == first.combined(second)
    assert recorded.weight(("L00", "q")) == pytest.approx(0.5 * 2 * 0.5 * 3)
    torch.testing.assert_close(out.modules[("L00", "q")].b, lora.modules[("L00", "q")].b * 1.5)
    assert recorded_weights(lora) is None

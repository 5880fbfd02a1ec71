"""Per-module norm and effective rank, the text table and the heatmap."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from trainer.lora.canonical import Lora, LoraError, LoraModule
from trainer.lora.inspect import (
    CELL,
    HEADER_H,
    LABEL_W,
    MARGIN,
    TITLE_H,
    colour,
    effective_rank,
    heatmap_png,
    heatmap_size,
    module_stats,
    stats_table,
)
from trainer.lora.spec import BASE, COMPONENTS, ZIT, ModuleKey
from trainer.lora.synth import random_lora

Q, W2, ADALN, EMB = ("L00", "q"), ("L03", "w2"), ("NR1", "adaLN"), (BASE, "t_embedder.mlp.2")


def spectrum_module(s: list[float], key: ModuleKey = Q, seed: int = 0) -> LoraModule:
    """A module whose dW has exactly the singular values `s` (orthonormal U and V)."""
    out_f, in_f = ZIT.shape(key)
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, len(s), generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_f, len(s), generator=gen, dtype=torch.float64))[0]
    return LoraModule(v.T.contiguous(), u * torch.tensor(s, dtype=torch.float64))


def test_norm_equals_explicit_frobenius_norm() -> None:
    lora = random_lora(5, keys=[Q, W2, ADALN, EMB], seed=3, dtype=torch.bfloat16)
    stats = module_stats(lora)
    for key, m in lora.modules.items():
        want = float(torch.linalg.matrix_norm(m.b.double() @ m.a.double()))
        assert stats[key].norm == pytest.approx(want, rel=1e-10)
        assert stats[key].rank == 5


def test_effective_rank_of_rank_one_and_flat_spectra() -> None:
    lora = Lora({Q: spectrum_module([3.0]), W2: spectrum_module([2.0] * 6, key=W2),
                 ADALN: spectrum_module([5.0, 0.0, 0.0], key=ADALN)})
    stats = module_stats(lora)
    assert stats[Q].effective_rank == pytest.approx(1.0, abs=1e-9)
    assert stats[W2].effective_rank == pytest.approx(6.0, abs=1e-9)
    assert stats[ADALN].effective_rank == pytest.approx(1.0, abs=1e-6)  # nominal rank 3, one direction
    assert stats[ADALN].rank == 3


def test_effective_rank_matches_explicit_svd() -> None:
    m = random_lora(6, keys=[ADALN], seed=5).modules[ADALN]
    s = torch.linalg.svdvals(m.b.double() @ m.a.double())[:6]
    p = s / s.sum()
    want = math.exp(float(-(p * p.log()).sum()))
    assert module_stats(Lora({ADALN: m}))[ADALN].effective_rank == pytest.approx(want, rel=1e-9)
    assert 1.0 < want < 6.0


def test_effective_rank_of_zero_is_zero() -> None:
    assert effective_rank(torch.zeros(4)) == 0.0
    zero = Lora({Q: LoraModule(torch.randn(2, 3840), torch.zeros(3840, 2))})
    assert module_stats(zero)[Q].norm == 0.0


def _row(table: str, block: str, section: int = 0) -> list[str]:
    part = table.split("\n\n")[section]
    return next(line.split() for line in part.splitlines() if line.split()[:1] == [block])


def test_table_holds_the_numbers_of_a_known_module() -> None:
    lora = Lora({Q: spectrum_module([3.0, 4.0]), W2: spectrum_module([1.0], key=W2),
                 EMB: spectrum_module([0.5, 0.5], key=EMB)})
    table = stats_table(lora)
    header = _row(table, "block")
    assert header == ["block", *COMPONENTS, "all"]
    l00 = dict(zip(header, _row(table, "L00"), strict=True))
    assert l00["q"] == "5" and l00["all"] == "5" and l00["k"] == "-"
    p = torch.tensor([3 / 7, 4 / 7], dtype=torch.float64)
    erank = math.exp(float(-(p * p.log()).sum()))
    ranks = dict(zip(["block", *COMPONENTS], _row(table, "L00", section=1), strict=True))
    assert ranks["q"] == f"{erank:.2f}/2" and ranks["v"] == "-"
    assert _row(table, "L03")[COMPONENTS.index("w2") + 1] == "1"
    assert _row(table, "L01") == ["L01", *["-"] * 8, "-"]
    assert _row(table, "CR0")[1] == "-"
    assert _row(table, "BASE")[-1] == "0.7071"  # root sum of squares of the BASE modules' norms
    assert _row(table, "t_embedder.mlp.2", section=2) == ["t_embedder.mlp.2", "0.7071", "2.00", "2"]
    rows = [line.split()[0] for line in table.split("\n\n")[0].splitlines()[2:]]
    assert rows == [BASE, *ZIT.blocks()]


def test_table_without_base_modules_has_no_base_section() -> None:
    table = stats_table(random_lora(2, keys=[Q]))
    assert "BASE modules" not in table and len(table.split("\n\n")) == 2


def test_heatmap_size_labels_and_difference(tmp_path) -> None:
    one = random_lora(2, keys=[Q, W2, ADALN], seed=1)
    two = random_lora(2, keys=[Q, ("L20", "out")], seed=2)
    path = tmp_path / "one.png"
    image = heatmap_png(one, path)
    assert image.size == heatmap_size(len(ZIT.blocks())) == (340, 8 + 22 + 18 + 34 * CELL + 20 + 8)
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == image.size
    other = heatmap_png(two)
    assert image.tobytes() != other.tobytes()
    assert heatmap_png(one, metric="erank").tobytes() != image.tobytes()


def _cell(image: Image.Image, block: str, component: str) -> tuple[int, int, int]:
    row, col = ZIT.blocks().index(block), COMPONENTS.index(component)
    x = MARGIN + LABEL_W + col * CELL + CELL // 2
    y = MARGIN + TITLE_H + HEADER_H + row * CELL + CELL // 2
    return image.getpixel((x, y))


def test_heatmap_cells_follow_the_values() -> None:
    lora = Lora({Q: spectrum_module([1.0]), ("L01", "q"): spectrum_module([4.0], key=("L01", "q"))})
    image = heatmap_png(lora)
    assert _cell(image, "L01", "q") == colour(1.0)  # the maximum
    assert _cell(image, "L00", "q") == colour(0.25)  # the scale starts at 0
    assert _cell(image, "L00", "k") == (225, 225, 225)  # no module: grey


def test_heatmap_refuses_unknown_metrics() -> None:
    with pytest.raises(LoraError, match="'spectral'"):
        heatmap_png(random_lora(1, keys=[Q]), metric="spectral")

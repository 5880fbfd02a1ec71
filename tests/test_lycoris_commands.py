"""`python -m trainer lora ...` on LyCORIS files (LoKr, LoHa, full diff) and on Z-Image-Fun distill LoRAs.

The LyCORIS file uses three producers' names (LyCORIS `lycoris_`, musubi `lora_unet_`, ai-toolkit/ComfyUI
`diffusion_model.`) on full-size Z-Image modules. Every number the commands print or write is checked
against dW built here by its definition (einsum Kronecker product, Hadamard product of two dense
products) and singular values from a float64 SVD of that dense dW.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from trainer.cli import main
from trainer.lora.any_file import delta_stats, read_any
from trainer.lora.canonical import LoraError
from trainer.lora.formats import read_lora
from trainer.lora.lycoris import DeltaFile
from trainer.lora.spec import ZIT
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora

D = ZIT.dim  # 3840
Q, K = ("L00", "q"), ("L00", "k")
ADALN, EMB = ("NR0", "adaLN"), ("BASE", "all_x_embedder.2-1")
NAMES = {Q: "layers.0.attention.to_q", K: "layers.0.attention.to_k",
         ADALN: "noise_refiner.0.adaLN_modulation.0", EMB: "all_x_embedder.2-1"}
RANKS = {Q: 64, K: 16, ADALN: 8, EMB: 64}  # rank of each dW by construction


def rnd(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def kron_ref(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) by definition: row i*b + j, column k*d + l holds w1[i, k] * w2[j, l] (float64)."""
    (a, c), (b, d) = w1.shape, w2.shape
    return torch.einsum("ik,jl->ijkl", w1.double(), w2.double()).reshape(a * b, c * d)


def svals(dw: torch.Tensor, rank: int) -> torch.Tensor:
    """Singular values of a dense float64 dW of rank <= `rank`: project on its range, then a small SVD."""
    if min(dw.shape) <= 4 * rank:
        return torch.linalg.svdvals(dw)
    g = torch.randn(dw.shape[1], 2 * rank, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    basis = torch.linalg.qr(dw @ g).Q
    return torch.linalg.svdvals(basis.T @ dw)


def tail(s: torch.Tensor, k: int) -> float:
    """||dW - dW_k||_F / ||dW||_F of the best rank-k approximation."""
    sq = s.square()
    return math.sqrt(float(sq[k:].sum() / sq.sum()))


@pytest.fixture(scope="module")
def lyco(tmp_path_factory) -> tuple[Path, dict, dict]:
    """(file, dense float64 dW per module, singular values per module)."""
    q, k = "lycoris_layers_0_attention_to_q", "lora_unet_layers_0_attention_to_k"
    ada, emb = "diffusion_model.noise_refiner.0.adaLN_modulation.0", "lycoris_all_x_embedder_2-1"
    sd = {  # LyCORIS LoKr (factor 16: full w1, decomposed w2), scale alpha / w2 rank = 2 / 4
        f"{q}.lokr_w1": rnd(16, 16, seed=1), f"{q}.lokr_w2_a": rnd(240, 4, seed=2),
        f"{q}.lokr_w2_b": rnd(4, 240, seed=3), f"{q}.alpha": torch.tensor(2.0),
        # musubi LoHa, ranks 4 x 4, scale alpha / 4 = 2
        f"{k}.hada_w1_a": rnd(D, 4, seed=4), f"{k}.hada_w1_b": rnd(4, D, seed=5),
        f"{k}.hada_w2_a": rnd(D, 4, seed=6), f"{k}.hada_w2_b": rnd(4, D, seed=7),
        f"{k}.alpha": torch.tensor(8.0),
        # ComfyUI-named LoKr on a noise-refiner adaLN (15360 x 256), both factors decomposed, no alpha
        f"{ada}.lokr_w1_a": rnd(16, 4, seed=8), f"{ada}.lokr_w1_b": rnd(4, 4, seed=9),
        f"{ada}.lokr_w2_a": rnd(960, 2, seed=10), f"{ada}.lokr_w2_b": rnd(2, 64, seed=11),
        f"{emb}.diff": rnd(D, 64, seed=12),  # a full diff on a BASE module (3840 x 64)
    }
    t = {n: v.double() for n, v in sd.items()}
    dense = {
        Q: 0.5 * kron_ref(t[f"{q}.lokr_w1"], t[f"{q}.lokr_w2_a"] @ t[f"{q}.lokr_w2_b"]),
        K: 2.0 * (t[f"{k}.hada_w1_a"] @ t[f"{k}.hada_w1_b"]) * (t[f"{k}.hada_w2_a"] @ t[f"{k}.hada_w2_b"]),
        ADALN: kron_ref(t[f"{ada}.lokr_w1_a"] @ t[f"{ada}.lokr_w1_b"],
                        t[f"{ada}.lokr_w2_a"] @ t[f"{ada}.lokr_w2_b"]),
        EMB: t[f"{emb}.diff"],
    }
    path = tmp_path_factory.mktemp("lyco") / "style_lokr.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path, dense, {key: svals(dw, RANKS[key]) for key, dw in dense.items()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def grid(out: str, title: str) -> dict[str, dict[str, str]]:
    """The blocks x components table after the line starting with `title`: block -> column -> cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(header):
            break
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_inspect_shows_kinds_norms_and_ranks_of_the_real_dw(lyco, capsys, tmp_path):
    path, dense, s = lyco
    png = tmp_path / "h.png"
    code, out, err = run(capsys, "lora", "inspect", str(path), "--heatmap", str(png), "--metric", "erank")
    assert code == 0, err
    assert out.startswith(f"{path}: LyCORIS file, 4 modules (LoKr 2, LoHa 1, full diff 1), ")
    params = 16 * 16 + 2 * 240 * 4 + 4 * 4 * D + 16 * 4 + 4 * 4 + 960 * 2 + 2 * 64 + D * 64
    assert f"{params:,} parameters" in out
    assert "scale alpha/rank 0.5 (1 module), 1 (2 modules), 2 (1 module)" in out
    kinds = grid(out, "Adapter per module")
    cells = [kinds["L00"]["q"], kinds["L00"]["k"], kinds["NR0"]["adaLN"], kinds["L01"]["q"]]
    assert cells == ["K", "H", "K", "-"]
    assert "BASE modules: all_x_embedder.2-1 D" in out
    want = {key: float(dw.norm()) for key, dw in dense.items()}
    norms = grid(out, "Frobenius norm of dW")
    for (block, comp) in (Q, K, ADALN):
        assert float(norms[block][comp]) == pytest.approx(want[(block, comp)], rel=6e-4)
    assert float(norms["L00"]["all"]) == pytest.approx(math.hypot(want[Q], want[K]), rel=6e-4)
    base_row = next(line for line in out.splitlines() if line.startswith("all_x_embedder.2-1  "))
    assert float(base_row.split()[1]) == pytest.approx(want[EMB], rel=6e-4)
    ranks = grid(out, "Effective rank / numerical rank of dW")
    for (block, comp) in (Q, K, ADALN):
        p = s[(block, comp)] / s[(block, comp)].sum()
        erank = math.exp(float(-(p[p > 0] * p[p > 0].log()).sum()))
        e, r = ranks[block][comp].split("/")
        assert float(e) == pytest.approx(erank, abs=0.006) and int(r) == RANKS[(block, comp)]
    assert png.stat().st_size > 0 and "heatmap written" in out
    # The library numbers behind the table, at full precision.
    stats = delta_stats(read_any(path))
    for key in dense:
        assert stats[key].norm == pytest.approx(want[key], rel=1e-6), key
        assert stats[key].rank == RANKS[key]


def report_rows(out: str) -> dict[str, tuple[str, float]]:
    """module -> (kept rank, relative error) from the conversion report's worst-modules table."""
    rows = {}
    for line in out.splitlines():
        m = re.fullmatch(r"  (\S+)\s+(\d+|-)\s+([0-9.e+-]+)", line)
        if m and m.group(1) != "worst":
            rows[m.group(1)] = (m.group(2), float(m.group(3)))
    return rows


def test_convert_full_rank_reproduces_dw(lyco, capsys, tmp_path):
    path, dense, _ = lyco
    out_path = tmp_path / "full.safetensors"
    code, out, err = run(capsys, "lora", "convert", str(path), "-o", str(out_path), "--rank", "64", "--to",
                         "comfy")
    assert code == 0, err
    assert "LoKr 2, LoHa 1, full diff 1 -> LoRA by SVD (rank 64; kept rank 8..64)" in out
    lora = read_lora(out_path)
    assert lora.metadata["zit.format"] == "comfy" and lora.metadata["ss_network_module"] == "lycoris.kohya"
    assert {k: m.rank for k, m in lora.modules.items()} == RANKS
    for key, dw in dense.items():
        assert rel(lora.modules[key].delta(), dw) < 3e-6, key
    rows = report_rows(out)
    assert set(rows) == set(NAMES.values()) and max(e for _, e in rows.values()) < 1e-6


@pytest.mark.parametrize("argv", [["--rank", "4"], ["--energy", "0.9"], ["--rank", "6", "--energy", "0.9"]])
def test_convert_low_rank_reports_the_svd_error(lyco, capsys, tmp_path, argv):
    path, dense, s = lyco
    out_path = tmp_path / "low.safetensors"
    code, out, err = run(capsys, "lora", "convert", str(path), "-o", str(out_path), *argv)
    assert code == 0, err
    rank = int(argv[argv.index("--rank") + 1]) if "--rank" in argv else None
    energy = float(argv[argv.index("--energy") + 1]) if "--energy" in argv else None
    lora, rows = read_lora(out_path), report_rows(out)
    errors = []
    for key, dw in dense.items():
        sq = s[key].square()
        k = len(sq) if rank is None else rank  # energy: least k with cumulative share >= energy
        if energy is not None:
            k = min(k, int((torch.cumsum(sq, 0) / sq.sum() < energy).sum()) + 1)
        want = tail(s[key], k)
        errors.append(want)
        assert lora.modules[key].rank == k, key
        assert rows[NAMES[key]] == (str(k), pytest.approx(want, rel=1e-3)), key
        assert rel(lora.modules[key].delta(), dw) == pytest.approx(want, rel=1e-3), key
    summary = re.search(r"mean (\S+), max (\S+) over 4 modules", out)
    assert float(summary.group(1)) == pytest.approx(sum(errors) / 4, rel=1e-3)
    assert float(summary.group(2)) == pytest.approx(max(errors), rel=1e-3)


def test_scale_and_merge_take_lycoris_inputs(lyco, capsys, tmp_path):
    path, dense, _ = lyco
    scaled = tmp_path / "scaled.safetensors"
    code, out, err = run(capsys, "lora", "scale", str(path), "-o", str(scaled), "--ratio", "0.5",
                         "--blocks", "NR=0", "--components", "k=3", "--rank", "64")
    assert code == 0, err
    assert "-> LoRA by SVD (rank 64; kept rank 8..64)" in out
    got = read_lora(scaled).modules
    assert set(got) == {Q, K, EMB}
    for key, w in ((Q, 0.5), (K, 1.5), (EMB, 0.5)):
        assert rel(got[key].delta(), w * dense[key]) < 3e-6, key
    plain = tmp_path / "plain.safetensors"
    other = random_lora(4, keys=[Q, ("L05", "w2")], seed=3)
    write_lora(other, plain, dialect="kohya")
    merged = tmp_path / "merged.safetensors"
    code, out, err = run(capsys, "lora", "merge", str(path), str(plain), "-o", str(merged), "--ratio", "0.7",
                         "--ratio", "0.3", "--rank", "64")
    assert code == 0, err
    m = read_lora(merged).modules
    assert set(m) == {Q, K, ADALN, EMB, ("L05", "w2")}
    want_q = 0.7 * dense[Q] + 0.3 * other.modules[Q].delta().double()
    assert rel(m[Q].delta(), want_q) < 3e-6 and rel(m[ADALN].delta(), 0.7 * dense[ADALN]) < 3e-6
    code, out, err = run(capsys, "lora", "merge", str(path), str(plain), "-o", str(merged), "--overwrite",
                         "--mode", "svd", "--rank", "8")
    assert code == 0, err
    assert "-> LoRA by SVD (rank 8; kept rank 8)" in out and max(read_lora(merged).ranks()) == 8


@pytest.mark.parametrize(
    "argv, words",
    [
        (["convert", "{lyco}", "-o", "{out}"],
         ["{lyco}", "LoKr 2, LoHa 1, full diff 1", "--rank N or --energy F"]),
        (["scale", "{lyco}", "-o", "{out}", "--ratio", "1"], ["{lyco}", "--rank N"]),
        (["merge", "{plain}", "{lyco}", "-o", "{out}"], ["{lyco}", "--rank N"]),
        (["convert", "{plain}", "-o", "{out}", "--rank", "4"], ["{plain}", "plain LoRA", "--mode svd"]),
        (["convert", "{lyco}", "-o", "{out}", "--rank", "4", "--from", "kohya"], ["{lyco}", "'kohya'"]),
        (["convert", "{lyco}", "-o", "{out}", "--energy", "1.5"], ["--energy 1.5", "(0, 1]"]),
        (["convert", "{lyco}", "-o", "{out}", "--rank", "0"], ["--rank 0"]),
        (["merge", "{plain}", "-o", "{out}", "--rank", "4"], ["--mode svd"]),
        (["merge", "{lyco}", "-o", "{out}", "--mode", "svd", "--rank", "4", "--energy", "0.5"],
         ["exactly one"]),
    ],
)
def test_refusals_exit_2_with_one_line(lyco, capsys, tmp_path, argv, words):
    plain = write_lora(random_lora(2, keys=[Q], seed=1), tmp_path / "plain.safetensors", dialect="kohya")
    names = {"lyco": lyco[0], "plain": plain, "out": tmp_path / "o.safetensors"}
    code, out, err = run(capsys, "lora", *(a.format(**names) for a in argv))
    err = err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w.format(**names) in err, (w, err)
    assert not names["out"].exists()


def test_read_lora_refuses_lycoris_with_what_to_do(lyco):
    with pytest.raises(LoraError) as e:
        read_lora(lyco[0])
    msg = str(e.value)
    assert "\n" not in msg and str(lyco[0]) in msg and "lora convert IN -o OUT --rank N" in msg
    assert isinstance(read_any(lyco[0]), DeltaFile)


# ---- Z-Image-Fun distill LoRAs (alibaba-pai, VideoX-Fun's kohya names with `lora_unet__`) ---------------

FUN_COMPONENTS = {"q": "attention_to_q", "k": "attention_to_k", "v": "attention_to_v",
                  "out": "attention_to_out_0", "w1": "feed_forward_w1", "w2": "feed_forward_w2",
                  "w3": "feed_forward_w3", "adaLN": "adaLN_modulation_0"}
# block, its name in the file, (rank, alpha): the real 8-step file has rank 128, alpha 128 everywhere.
FUN_BLOCKS = (("L00", "layers_0", (128, 128.0)), ("NR1", "noise_refiner_1", (8, 4.0)),
              ("CR0", "context_refiner_0", (16, 32.0)))


def fun_file(tmp_path: Path, prefix: str = "lora_unet__") -> tuple[Path, dict]:
    sd, want = {}, {}
    seed = 0
    for block, name, (rank, alpha) in FUN_BLOCKS:
        for comp, suffix in FUN_COMPONENTS.items():
            if comp not in ZIT.components(block):
                continue
            out_f, in_f = ZIT.shape((block, comp))
            seed += 2
            base = f"{prefix}{name}_{suffix}"
            down, up = rnd(rank, in_f, seed=seed), rnd(out_f, rank, seed=seed + 1)
            sd |= {f"{base}.lora_down.weight": down.bfloat16(), f"{base}.lora_up.weight": up.bfloat16(),
                   f"{base}.alpha": torch.tensor(alpha, dtype=torch.bfloat16)}
            want[(block, comp)] = (up.bfloat16().double(), down.bfloat16().double(), alpha / rank)
    path = tmp_path / f"fun{prefix.count('_')}.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return path, want


def check_scale(lora, want: dict) -> None:
    """dW = up @ down * alpha / rank on every module, tested on random probes (dW itself never formed)."""
    assert set(lora.modules) == set(want)
    for key, (up, down, scale) in want.items():
        x = torch.randn(down.shape[1], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        m = lora.modules[key]
        got = m.b.double() @ (m.a.double() @ x)
        expect = scale * (up @ (down @ x))
        assert float((got - expect).norm() / expect.norm()) < 5e-3, key  # the scale folded into bf16 B


@pytest.mark.parametrize("prefix", ["lora_unet__", "lora_unet_"])  # Fun distill; musubi's raw kohya names
def test_fun_distill_and_musubi_names_read_with_alpha_over_rank(tmp_path, capsys, prefix):
    path, want = fun_file(tmp_path, prefix)
    lora = read_lora(path)
    assert lora.metadata["zit.format"] == "kohya" and len(lora) == 8 + 8 + 7
    assert {m.rank for k, m in lora.modules.items() if k[0] == "L00"} == {128}
    check_scale(lora, want)
    out_path = tmp_path / "comfy.safetensors"
    code, out, err = run(capsys, "lora", "convert", str(path), "-o", str(out_path), "--to", "comfy",
                         "--dtype", "fp32")
    assert code == 0, err
    assert "23 modules written as comfy" in out
    check_scale(read_lora(out_path), want)


def test_module_entry_point_inspects_a_lokr(lyco):
    proc = subprocess.run([sys.executable, "-m", "trainer", "lora", "inspect", str(lyco[0])],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "LoKr 2, LoHa 1, full diff 1" in proc.stdout and "numerical rank" in proc.stdout

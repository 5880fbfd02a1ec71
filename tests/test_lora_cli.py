"""The `python -m trainer lora ...` command line: every command on real files, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.cli import main
from trainer.lora.blocks import resolve
from trainer.lora.formats import read_lora
from trainer.lora.spec import ZIT
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora

KEYS = [k for k in ZIT.module_keys() if k[0] in ("L00", "L15", "L29", "NR0", "CR1")]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a_kohya.safetensors", tmp_path / "b_comfy.safetensors"
    write_lora(random_lora(4, keys=KEYS, seed=1), a, dialect="kohya")
    write_lora(random_lora(2, keys=KEYS[:10], seed=2), b, dialect="comfy")
    return a, b


def deltas(path: Path) -> dict:
    """dW of every module seen through a fixed random probe, dW @ P (P: in_features x 8): two updates of rank
    < in_features with the same probe image are equal (almost surely), without building full-size dW."""
    out = {}
    for k, m in read_lora(path).modules.items():
        probe = torch.randn(m.a.shape[1], 8, generator=torch.Generator().manual_seed(0)) / m.a.shape[1] ** 0.5
        out[k] = m.b.float() @ (m.a.float() @ probe)
    return out


def test_inspect_prints_table_and_writes_heatmap(files, tmp_path, capsys):
    png = tmp_path / "h.png"
    assert main(["lora", "inspect", str(files[0]), "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "L15" in out and png.stat().st_size > 0


def test_convert_keeps_dw(files, tmp_path):
    out = tmp_path / "c.safetensors"
    assert main(["lora", "convert", str(files[1]), "-o", str(out), "--to", "diffusers"]) == 0
    before, after = deltas(files[1]), deltas(out)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])


def test_scale_applies_ratio_blocks_and_components(files, tmp_path):
    out = tmp_path / "s.safetensors"
    argv = ["lora", "scale", str(files[0]), "-o", str(out), "--ratio", "0.5", "--blocks", "L15=0,NR=2",
            "--components", "adaLN=0"]
    assert main(argv) == 0
    w = resolve("L15=0,NR=2", "adaLN=0", 0.5)
    before, after = deltas(files[0]), deltas(out)
    assert set(after) == {k for k in before if w.weight(k) != 0}
    for k, d in after.items():
        torch.testing.assert_close(d, before[k] * w.weight(k))


def test_scale_requires_ratio(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lora", "scale", str(files[0]), "-o", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "--ratio" in capsys.readouterr().err


def test_merge_exact_and_svd(files, tmp_path):
    exact, svd = tmp_path / "m.safetensors", tmp_path / "m8.safetensors"
    argv = ["lora", "merge", *map(str, files), "-o", str(exact), "--ratio", "0.7", "--ratio", "0.3"]
    assert main(argv) == 0
    a, b, m = deltas(files[0]), deltas(files[1]), deltas(exact)
    for k in m:
        torch.testing.assert_close(m[k], 0.7 * a[k] + 0.3 * b.get(k, 0), atol=1e-6, rtol=1e-4)
    assert main(["lora", "merge", *map(str, files), "-o", str(svd), "--mode", "svd", "--rank", "6"]) == 0
    assert max(read_lora(svd).ranks()) == 6  # modules whose exact sum has rank 4 keep 4


@pytest.mark.parametrize(
    "argv, words",
    [
        (["lora", "inspect", "missing.safetensors"], "missing.safetensors"),
        (["lora", "scale", "{a}", "-o", "{out}", "--ratio", "1", "--blocks", "L40=1"], "L40"),
        (["lora", "merge", "{a}", "{b}", "-o", "{out}", "--ratio", "1", "--ratio", "2", "--ratio", "3"],
         "--ratio"),
        (["lora", "merge", "{a}", "-o", "{out}", "--mode", "svd"], "--rank"),
        (["lora", "inspect", "{junk}"], "junk.safetensors"),
    ],
)
def test_bad_input_exits_2_with_one_line(files, tmp_path, capsys, argv, words):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    names = {"a": files[0], "b": files[1], "out": tmp_path / "o.safetensors", "junk": junk}
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_module_entry_point_runs(files):
    proc = subprocess.run([sys.executable, "-m", "trainer", "lora", "inspect", str(files[1])],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "comfy" in proc.stdout


def test_the_older_positional_output_and_overwrite(files, tmp_path):
    """`convert IN OUT` still works and writes what `convert IN -o OUT` writes; `--overwrite` may replace an
    existing file, even the input itself (read first, then written atomically)."""
    old, new = tmp_path / "old.safetensors", tmp_path / "new.safetensors"
    assert main(["lora", "convert", str(files[0]), str(old), "--to", "comfy"]) == 0
    assert main(["lora", "convert", str(files[0]), "-o", str(new), "--to", "comfy"]) == 0
    old_d, new_d = deltas(old), deltas(new)
    assert old_d.keys() == new_d.keys()
    for k, d in new_d.items():
        torch.testing.assert_close(old_d[k], d)
    before = deltas(files[0])
    assert main(["lora", "scale", str(files[0]), "-o", str(files[0]), "--ratio", "2", "--overwrite"]) == 0
    after = deltas(files[0])
    assert after.keys() == before.keys()
    for k, d in after.items():
        torch.testing.assert_close(d, 2 * before[k])

"""The catalogue of bad input, shared by the tests/test_bad_inputs_*.py files: what every refusal must be.

A refusal exits with code 2 and writes exactly one stderr line, `error: ...`, naming the file, key, field or
value, with no traceback; nothing is written (no output file, no run or output folder) and every input keeps
its bytes and its modification time. Here: the files every case reads (the module-scoped `world` fixture;
a test module imports `world as world`), the checks of that contract, and the tiny training config the cases
change.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch

from trainer.cli import main
from trainer.demo import make_dataset
from trainer.lora.spec import ZIT
from trainer.lora.synth import random_lora
from trainer.lora.writing import write_lora

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
KEYS = [k for k in ZIT.module_keys() if k[0] in ("L00", "L29", "NR0")]
BIG = ("L29", "w2")  # the module of big.safetensors whose values overflow fp16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs shared by the cases (never written: each case checks their bytes and times)."""
    root = tmp_path_factory.mktemp("world")
    write_lora(random_lora(4, keys=KEYS, seed=1), root / "a.safetensors", dialect="kohya")
    write_lora(random_lora(2, keys=KEYS[:8], seed=2), root / "b.safetensors", dialect="comfy")
    big = random_lora(2, keys=KEYS[:4] + [BIG], seed=3)
    big.modules[BIG].b.mul_(1e6)  # |dW| factors ~2e4: fine in fp32 and bf16, too large for fp16
    write_lora(big, root / "big.safetensors", dtype=torch.float32)
    lokr = {"lycoris_layers_0_attention_to_q.lokr_w1": torch.randn(16, 16) * 0.1,
            "lycoris_layers_0_attention_to_q.lokr_w2": torch.randn(240, 240) * 0.1}
    from safetensors.torch import save_file

    save_file(lokr, str(root / "lokr.safetensors"))
    (root / "junk.safetensors").write_bytes(b"not a safetensors file")
    (root / "afile").write_text("a file, not a folder")
    (root / "folder").mkdir()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("keep")
    shutil.copy(root / "b.safetensors", root / "existing.safetensors")
    (root / "existing.png").write_bytes(b"an earlier heatmap")
    images = make_dataset(root / "images", n=2, size=SIZE)
    (root / "empty").mkdir()
    (root / "nocap").mkdir()
    shutil.copy(images / "circle_00.png", root / "nocap" / "a.png")
    shutil.copytree(images, root / "corrupt")
    (root / "corrupt" / "circle_00.png").write_bytes(b"not a png")
    make_dataset(root / "small", n=2, size=16)
    shutil.copytree(images, root / "badcap")
    (root / "badcap" / "circle_00.txt").write_bytes(b"\xff\xfe a caption in UTF-16")
    write_lora(random_lora(2, keys=KEYS[:3], seed=4), root / "full_size_adapter.safetensors")
    (root / "prompts.txt").write_text("a red circle\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under root: size, modification time (ns) and SHA-256."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv: list[Any]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, err: str, words: list[str]) -> str:
    """Exit code 2, exactly one stderr line `error: ...` containing every word, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def fill(items: list[str], names: dict[str, Path]) -> list[str]:
    return [item.format(**{k: str(v) for k, v in names.items()}) for item in items]


def base_config(out: Path, images: Path) -> dict[str, dict[str, Any]]:
    """A tiny fp32 run writing to `out` (which does not exist yet)."""
    return {
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(images), "resolutions": [SIZE], "min_side": 32, "caption_dropout": 0.0},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 2, "seed": 0},
        "save": {"output_dir": str(out), "name": "run", "every": 0},
        "preview": {"every": 0, "health_every": 0},
    }


def write_config(path: Path, out: Path, world: Path, change: dict | str | bytes) -> None:
    if isinstance(change, bytes):
        path.write_bytes(change)
        return
    if isinstance(change, str):
        path.write_text(change)
        return
    d = base_config(out, world / "images")
    for dotted, value in change.items():
        section, key = dotted.split(".")
        if isinstance(value, str):
            value = value.format(world=world)
        d.setdefault(section, {})[key] = value
    path.write_text(tomli_w.dumps(d))

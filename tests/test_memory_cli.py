"""Memory sizes and the `plan` command: --vram parsing and its refusals, free VRAM without CUDA, and the
CLI's table, plan, per-card lines, refusals and a spec read from a checkpoint header.
"""

from __future__ import annotations

import re

import pytest
import torch

from trainer.cli import main as cli_main
from trainer.errors import ZitError
from trainer.memory import GiB, free_vram, parse_vram

# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("12GB", 12 * GiB), ("12 GiB", 12 * GiB), ("11.5G", int(11.5 * GiB)), ("12000MB", 12000 * 2**20),
    ("12000MiB", 12000 * 2**20), ("8gb", 8 * GiB), (" 24 ", 24 * GiB), ("1T", 2**40),
])
def test_parse_vram_sizes(text: str, expected: int) -> None:
    assert parse_vram(text) == expected


@pytest.mark.parametrize("text", ["12XB", "", "GB", "-3GB", "0GB", "12 G B", "twelve"])
def test_parse_vram_refuses(text: str) -> None:
    with pytest.raises(ZitError, match=re.escape(f"--vram {text}: not a size; use e.g. 12GB")):
        parse_vram(text)


def test_free_vram_is_none_without_cuda() -> None:
    assert free_vram("cpu") is None
    if not torch.cuda.is_available():
        assert free_vram("cuda") is None


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def run_toml(tmp_path) -> str:
    path = tmp_path / "run.toml"
    path.write_text('[model]\ntransformer = "tiny"\n[data]\ndataset = "images"\nresolutions = [256]\n'
                    '[preview]\nevery = 0\n')
    return str(path)


def test_cli_plan_prints_the_table_and_the_plan(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--vram", "8GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("budget: 8.00 GiB (--vram 8GB); transformer: 3 layers, dim 64")
    assert "total (peak)" in out and "activations" in out
    assert out.rstrip().endswith('plan: bf16 at 256 px (model.memory = "bf16")')


def test_cli_plan_refuses_bad_sizes_and_too_small_budgets(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--vram", "12XB"]) == 2
    assert capsys.readouterr().err.strip() == "error: --vram 12XB: not a size; use e.g. 12GB"
    assert cli_main(["plan", "--config", run_toml, "--vram", "0.1GB"]) == 2
    captured = capsys.readouterr()
    assert "total (peak)" in captured.out
    assert captured.err.startswith("error: 0.1 GiB free is not enough for any plan: the smallest, ")


def test_cli_plan_per_card(run_toml: str, capsys) -> None:
    assert cli_main(["plan", "--config", run_toml, "--card", "0.5GB, 8GB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("0.5GB") and "nothing fits" in lines[0]
    assert lines[1].startswith("8GB") and "bf16 at 256 px" in lines[1]


def test_cli_plan_reads_the_spec_from_a_checkpoint_header(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from trainer.model import to_comfy_state_dict
    from trainer.tiny import tiny_transformer

    ckpt = tmp_path / "zit.safetensors"
    save_file(to_comfy_state_dict(tiny_transformer(0).state_dict(), "model.diffusion_model."), ckpt)
    run = tmp_path / "run.toml"
    run.write_text(f'[model]\ntransformer = "{ckpt.as_posix()}"\ntext_encoder = "te.safetensors"\n'
                   'vae = "ae.safetensors"\nvram = "8GB"\n[data]\ndataset = "images"\n[preview]\nevery = 0\n')
    assert cli_main(["plan", "--config", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('budget: 8.00 GiB (model.vram = \'8GB\'); transformer: 3 layers, dim 64')
    assert cli_main(["plan", "--config", str(run).replace("run.toml", "none.toml")]) == 2

"""Bad input on the command line and to the LoRA tools: every refusal is one line, early, and loses nothing.

Each case runs the real command line in this process (`trainer.cli.main`) on real files: argparse's own
refusals, missing or unreadable inputs, outputs over a file or an input, values that would write Inf/NaN,
contradictory options, demo output folders and `plan`. Nothing trainer.cli imports imports it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomli_w
from _bad_inputs_world import (
    BIG,
    REPO,
    assert_refused,
    base_config,
    fill,
    run_cli,
    snapshot,
)
from _bad_inputs_world import world as world  # a fixture (module-scoped here)

from trainer.lora.spec import diffusers_name

pytestmark = pytest.mark.usefixtures("one_thread")


CLI_CASES = {
    # argparse: one line, not the usage block
    "no command": ([], ["python -m trainer", "required"]),
    "unknown command": (["bogus"], ["bogus", "invalid choice"]),
    "train without --config": (["train"], ["--config"]),
    "unknown option": (["lora", "inspect", "{world}/a.safetensors", "--bogus"], ["--bogus"]),
    "ratio not a number": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "x"],
                           ["--ratio", "'x'"]),
    "scale without --ratio": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}"], ["--ratio"]),
    "unknown dialect": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--to", "klingon"],
                        ["klingon"]),
    "demo steps not a number": (["demo", "--steps", "many"], ["--steps", "'many'"]),
    # inputs
    "inspect a missing file": (["lora", "inspect", "{world}/missing.safetensors"],
                               ["missing.safetensors", "no such file"]),
    "inspect a junk file": (["lora", "inspect", "{world}/junk.safetensors"],
                            ["junk.safetensors", "not a readable .safetensors"]),
    "inspect a folder": (["lora", "inspect", "{world}/folder"], ["folder", "adapter_model.safetensors"]),
    "read as the wrong dialect": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--from",
                                   "comfy"], ["a.safetensors", "key"]),
    "merge a missing input": (["lora", "merge", "{world}/a.safetensors", "{world}/missing.safetensors",
                               "-o", "{new}"], ["missing.safetensors", "no such file"]),
    "a LoKr without a rank": (["lora", "convert", "{world}/lokr.safetensors", "-o", "{new}"],
                              ["lokr.safetensors", "--rank N"]),
    "merge a LoKr without a rank": (["lora", "merge", "{world}/a.safetensors", "{world}/lokr.safetensors",
                                     "-o", "{new}"], ["lokr.safetensors", "--rank N"]),
    # outputs: never over a file or an input without --overwrite, checked before any input is read
    "heatmap over the input": (["lora", "inspect", "{world}/a.safetensors", "--heatmap",
                                "{world}/a.safetensors"], ["--heatmap", "a.safetensors", "is also an input"]),
    "heatmap over a file": (["lora", "inspect", "{world}/a.safetensors", "--heatmap", "{world}/existing.png"],
                            ["existing.png", "already exists", "--overwrite"]),
    "metric without heatmap": (["lora", "inspect", "{world}/a.safetensors", "--metric", "erank"],
                               ["--metric erank", "--heatmap"]),
    "convert over an existing file": (["lora", "convert", "{world}/a.safetensors", "-o",
                                       "{world}/existing.safetensors"],
                                      ["existing.safetensors", "--overwrite"]),
    "convert over its input": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/a.safetensors"],
                               ["a.safetensors", "is also an input"]),
    "convert, old form, over its input": (["lora", "convert", "{world}/a.safetensors",
                                           "{world}/a.safetensors"], ["a.safetensors", "is also an input"]),
    "scale over its input": (["lora", "scale", "{world}/a.safetensors", "-o", "{world}/a.safetensors",
                              "--ratio", "2"], ["a.safetensors", "is also an input"]),
    "merge over an input": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o",
                             "{world}/b.safetensors"], ["b.safetensors", "is also an input"]),
    "merge, old form (output first)": (["lora", "merge", "{new}", "{world}/a.safetensors",
                                        "{world}/b.safetensors"], ["lora merge", "-o OUT", "no longer"]),
    "output is a folder": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/folder"],
                           ["folder", "is a folder"]),
    "output under a file": (["lora", "convert", "{world}/a.safetensors", "-o", "{world}/afile/x.safetensors"],
                            ["afile", "is a file, not a folder"]),
    "two outputs": (["lora", "convert", "{world}/a.safetensors", "{new}", "-o", "{new}"], ["two outputs"]),
    "no output": (["lora", "convert", "{world}/a.safetensors"], ["no output", "-o OUT"]),
    # values that would write Inf/NaN, named by module
    "fp16 overflow": (["lora", "convert", "{world}/big.safetensors", "-o", "{new}", "--dtype", "fp16"],
                      ["new.safetensors", diffusers_name(BIG), "fp16"]),
    "ratio overflows fp16": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1e30",
                              "--dtype", "fp16"], ["new.safetensors", "module", "fp16"]),
    "ratio overflows fp32": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1e300"],
                             ["new.safetensors", "module", "not finite"]),
    "ratio nan": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "nan"],
                  ["--ratio nan", "finite"]),
    "ratio inf": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "inf"],
                  ["--ratio inf", "finite"]),
    "merge ratio nan": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--ratio", "nan"],
                        ["--ratio nan"]),
    # contradictory or out-of-range options
    "exact merge with a rank": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o",
                                 "{new}", "--rank", "4"], ["--rank", "--mode exact", "--mode svd"]),
    "svd merge without a target": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode", "svd"],
                                   ["--rank", "--energy"]),
    "svd merge with rank and energy": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode",
                                        "svd", "--rank", "4", "--energy", "0.5"], ["exactly one"]),
    "ratio count": (["lora", "merge", "{world}/a.safetensors", "{world}/b.safetensors", "-o", "{new}",
                     "--ratio", "1", "--ratio", "2", "--ratio", "3"], ["--ratio given 3 times for 2 inputs"]),
    "energy above 1": (["lora", "merge", "{world}/a.safetensors", "-o", "{new}", "--mode", "svd", "--energy",
                        "1.5"], ["--energy 1.5"]),
    "rank 0": (["lora", "convert", "{world}/lokr.safetensors", "-o", "{new}", "--rank", "0"], ["--rank 0"]),
    "rank with a plain LoRA": (["lora", "convert", "{world}/a.safetensors", "-o", "{new}", "--rank", "2"],
                               ["a.safetensors", "plain LoRA"]),
    "unknown block": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1", "--blocks",
                       "L40=1"], ["L40"]),
    "block vector length": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1",
                             "--blocks", "1,2,3"], ["3"]),
    "unknown component": (["lora", "scale", "{world}/a.safetensors", "-o", "{new}", "--ratio", "1",
                           "--components", "zz=1"], ["zz"]),
    # demos: an output folder that is a file or not empty
    "demo steps 0": (["demo", "--steps", "0", "-o", "{new}"], ["--steps 0"]),
    "demo into a file": (["demo", "-o", "{world}/afile"], ["afile", "is a file"]),
    "demo into a used folder": (["demo", "-o", "{world}/nonempty"], ["nonempty", "not empty", "--overwrite"]),
    "lora demo into a used folder": (["lora", "demo", "-o", "{world}/nonempty"], ["nonempty", "--overwrite"]),
    # plan
    "plan: bad --vram": (["plan", "--config", "{good}", "--vram", "lots"], ["--vram", "lots"]),
    "plan: bad --card": (["plan", "--config", "{good}", "--card", "12XB"], ["--card", "12XB"]),
    "plan: --text-tokens 0": (["plan", "--config", "{good}", "--text-tokens", "0"], ["--text-tokens 0"]),
    "plan: missing config": (["plan", "--config", "{world}/missing.toml"], ["missing.toml", "no such file"]),
}


@pytest.mark.parametrize("argv, words", list(CLI_CASES.values()), ids=list(CLI_CASES))
def test_cli_refusal(world, tmp_path, capsys, argv, words):
    good = tmp_path / "good.toml"
    good.write_text(tomli_w.dumps(base_config(tmp_path / "out", world / "images")))
    names = {"world": world, "new": tmp_path / "new.safetensors", "good": good}
    before = snapshot(world)
    code, _, err = run_cli(capsys, fill(argv, names))
    assert_refused(code, err, fill(words, names))
    assert snapshot(world) == before  # inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.toml"]  # nothing written


# ---- no import circle through the command line -----------------------------------------------------------


def _imports(path: Path, package: str) -> set[str]:
    """Modules of the trainer package that `path` imports (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            mod = f"{base}.{node.module}" if node.module else base
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("trainer")}
    return found


def test_nothing_the_command_line_imports_imports_it_back():
    """No import circle through trainer.cli (e.g. cli -> lora.commands -> lora.demo -> cli)."""
    root = REPO / "trainer"
    importers = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        if name not in ("trainer.cli", "trainer.__main__") and "trainer.cli" in _imports(path, package):
            importers.append(name)
    assert importers == []

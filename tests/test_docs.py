"""The documentation that ships with the project: it stays inside the repository, covers every setting, its
links resolve, and the command line's `config` printout and `--help` name the docs and every allowed value."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cli import build_parser
from trainer.config import TrainConfig, config_to_dict
from trainer.config_docs import allowed_values, fields_table, render_reference
from trainer.config_docs import main as config_docs_main
from trainer.config_fields import FIELDS, SECTIONS, _show
from trainer.lora.blocks import PRESETS
from trainer.lora.formats import DIALECTS
from trainer.lora.spec import COMPONENTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DOC_PAGES = sorted(DOCS.glob("*.md"))
MARKDOWN = [REPO / "README.md", *DOC_PAGES]
TEXT_SUFFIXES = {".py", ".md", ".js", ".json", ".toml", ".txt", ".sh", ".yml", ".yaml", ".cfg", ".ini", ""}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "venv", ".venv",
             "demo_output", "output", "out", "node_modules", "artifacts"}
# Notes that live outside the repository must never be named (spelt in two parts so this file passes too).
OUTSIDE_NOTES = ("DOMAIN" + ".md", "DESIGN" + ".md")
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|Users|root|mnt)/[\w.-]")
MD_NAME = re.compile(r"(?<![\w/.-])([\w/.-]*\w\.md)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def repo_text_files() -> list[Path]:
    """Every text file of the checkout (code, docs, web, workflows), skipping caches, venvs and outputs."""
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in names:
            path = Path(root) / name
            if path.suffix in TEXT_SUFFIXES and path.stat().st_size < 2_000_000:
                files.append(path)
    return files


def outside_references(path: Path, text: str, md_names: set[str]) -> list[str]:
    """What `text` (the content of `path`) names outside the repository: notes, machine paths, .md files."""
    rel = path.relative_to(REPO)
    problems = [f"{rel}: names {name}" for name in OUTSIDE_NOTES if name in text]
    problems += [f"{rel}: machine path {m.group(0)!r}" for m in MACHINE_PATH.finditer(text)]
    for m in MD_NAME.finditer(text):
        name = m.group(1)
        if not ((REPO / name).is_file() or (path.parent / name).is_file() or Path(name).name in md_names):
            problems.append(f"{rel}: names {name}, which is not in the repository")
    return problems


def test_no_file_names_notes_or_paths_outside_the_repository() -> None:
    files = repo_text_files()
    assert {REPO / "trainer" / "config.py", REPO / "web" / "zit_panel.js", REPO / "docs" / "turbo.md",
            REPO / "workflows" / "zit_lora_merge.json"} <= set(files)
    md_names = {p.name for p in files if p.suffix == ".md"}
    problems = [p for path in files
                for p in outside_references(path, path.read_text(encoding="utf-8", errors="replace"),
                                            md_names)]
    assert not problems, "\n".join(problems)
    # the check itself finds each kind of reference (spelt in parts so that this file passes the check)
    md, home = ".md", "/" + "home"
    text = (f"see {OUTSIDE_NOTES[0]}, {home}/me/run.toml, notes{md} and training{md}, README{md}, "
            f"docs/memory{md}")
    assert outside_references(DOCS / f"x{md}", text, md_names) == [
        f"docs/x{md}: names {OUTSIDE_NOTES[0]}", f"docs/x{md}: machine path '{home}/m'",
        f"docs/x{md}: names {OUTSIDE_NOTES[0]}, which is not in the repository",
        f"docs/x{md}: names notes{md}, which is not in the repository"]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _outside_code(text: str) -> list[str]:
    """The lines of a markdown text that are not inside ``` fences."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _outside_code(path.read_text(encoding="utf-8")):
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    lines = _outside_code(page.read_text(encoding="utf-8"))
    links = [m.group(1) for line in lines for m in LINK.finditer(line)]
    assert links, f"{page.name} has no links"
    broken = []
    for target in links:
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists() or REPO not in linked.parents:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_index_and_the_readme_link_every_doc() -> None:
    pages = {p.name for p in DOC_PAGES}
    assert {"README.md", "turbo.md", "training.md", "memory.md", "dialects.md", "block_weights.md"} <= pages
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    assert {f"({name})" for name in pages - {"README.md"}} <= set(re.findall(r"\([\w.]+\.md\)", index))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    assert {f"docs/{name}" for name in pages} == set(re.findall(r"\((docs/[\w.]+\.md)\)", section))


def _section_of(text: str, name: str) -> str:
    return text.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]


def test_training_doc_lists_every_field_with_its_default_and_choices() -> None:
    text = (DOCS / "training.md").read_text(encoding="utf-8")
    for spec in FIELDS.values():
        rows = [r for r in _section_of(text, spec.section).splitlines() if r.startswith(f"| `{spec.key}` |")]
        assert len(rows) == 1, f"docs/training.md: {spec.dotted} has {len(rows)} rows in ## {spec.section}"
        cells = [c.strip() for c in rows[0].split(" | ")]
        assert cells[1] == f"`{_show(spec.default)}`", f"docs/training.md: {spec.dotted} default"
        for choice in spec.choices:
            assert f"`{choice}`" in cells[2], f"docs/training.md: {spec.dotted} does not list {choice!r}"
    assert {s for s in SECTIONS} == set(re.findall(r"<!-- fields:(\w+) -->", text))


def test_training_doc_tables_are_current_and_the_regenerator_repairs_them(tmp_path) -> None:
    path = DOCS / "training.md"
    text = path.read_text(encoding="utf-8")
    assert render_reference(text) == text, "docs/training.md is stale: run `python -m trainer.config_docs`"
    assert config_docs_main([str(path), "--check"]) == 0
    stale = tmp_path / "training.md"
    stale.write_text(text.replace("| `ema_decay` |", "| `ema_decay_old` |"), encoding="utf-8")
    assert config_docs_main([str(stale), "--check"]) == 1
    assert config_docs_main([str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == text


def test_allowed_values_in_words() -> None:
    assert allowed_values(FIELDS["turbo.mode"]) == 'one of "sft", "base", "adapter", "adapter_dg", "distill"'
    assert allowed_values(FIELDS["optim.seed"]) == "an integer, 0 <= x < 2^63"
    assert allowed_values(FIELDS["data.caption_dropout"]) == "a number, 0 <= x < 1"
    assert allowed_values(FIELDS["lora.alpha"]) == "a number, x > 0"
    assert allowed_values(FIELDS["data.resolutions"]) == (
        "a non-empty list of integers, each 64 <= x <= 4096, a multiple of 16")
    assert allowed_values(FIELDS["optim.betas"]) == "a list of exactly 2 numbers, each 0 <= x < 1"
    assert allowed_values(FIELDS["model.vram"]).startswith('text that must be a size such as "12GB"')
    assert allowed_values(FIELDS["optim.ema"]) == "true or false"
    table = fields_table("model")
    assert table.count("\n") == 2 + sum(s.section == "model" for s in FIELDS.values())
    assert "\\*_swap" in table and "|" not in FIELDS["model.memory"].doc
    with pytest.raises(ValueError, match="unknown config section 'modle'"):
        fields_table("modle")


@pytest.fixture(scope="module")
def printed_config() -> str:
    done = subprocess.run([sys.executable, "-m", "trainer", "config"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout


def test_config_printout_names_the_docs_and_lists_every_choice(printed_config: str) -> None:
    assert tomllib.loads(printed_config) == config_to_dict(TrainConfig())
    header = printed_config.split("\n\n", 1)[0]
    named = set(re.findall(r"docs/[\w.]+\.md", header))
    assert {"docs/training.md", "docs/turbo.md", "docs/memory.md", "docs/README.md"} <= named
    assert all((REPO / name).is_file() for name in named)
    assert max(len(line) for line in printed_config.splitlines()) <= 110
    section = ""
    comments: list[str] = []
    for line in printed_config.splitlines():
        if line.startswith("#"):
            comments.append(line[2:])
        elif line.startswith("["):
            section, comments = line.strip("[]"), []
        elif " = " in line:
            spec = FIELDS[f"{section}.{line.split(' = ')[0]}"]
            said = " ".join(comments)
            assert spec.doc in said, spec.dotted
            if spec.choices:
                assert "allowed: one of " + ", ".join(f'"{c}"' for c in spec.choices) in said, spec.dotted
            comments = []


def _parsers(parser: argparse.ArgumentParser, name: str = "python -m trainer"):
    """The parser and every sub-command parser below it, with their command names."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_lists_every_choice_the_presets_and_the_docs(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no name is broken at a hyphen
    parsers = dict(_parsers(build_parser()))
    assert {"python -m trainer train", "python -m trainer config", "python -m trainer lora scale",
            "python -m trainer lora merge", "python -m trainer lora convert"} <= set(parsers)
    weighted = 0
    for name, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.choices and not isinstance(action, argparse._SubParsersAction):
                missing = [c for c in action.choices if str(c) not in text]
                assert not missing, f"{name} --help: {action.dest} does not list {missing}"
            if action.dest == "blocks":
                weighted += 1
                assert all(p in text for p in PRESETS), f"{name} --help: --blocks lacks the presets"
            if action.dest == "components":
                assert all(c in text for c in COMPONENTS), f"{name} --help: --components lacks components"
    assert weighted == 2  # scale and merge
    for command in ("train", "config"):
        text = parsers[f"python -m trainer {command}"].format_help()
        for spec in FIELDS.values():
            if spec.choices:
                assert f"{spec.dotted}: {', '.join(spec.choices)}" in text, f"{command} --help: {spec.dotted}"
        assert "docs/training.md" in text
    assert "docs/README.md" in parsers["python -m trainer"].format_help()
    lora_help = parsers["python -m trainer lora"].format_help()
    assert "docs/dialects.md" in lora_help and "docs/block_weights.md" in lora_help
    assert all(d in lora_help for d in DIALECTS)


def test_the_pages_cover_the_presets_dialects_and_modes() -> None:
    blocks = (DOCS / "block_weights.md").read_text(encoding="utf-8")
    assert [p for p in PRESETS if f"| `{p}` |" not in blocks] == []
    dialects = (DOCS / "dialects.md").read_text(encoding="utf-8")
    assert [d for d in DIALECTS if f"| `{d}` |" not in dialects] == []
    turbo = (DOCS / "turbo.md").read_text(encoding="utf-8")
    assert [m for m in FIELDS["turbo.mode"].choices if f"`{m}`" not in turbo] == []

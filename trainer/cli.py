"""The command line: `python -m trainer {demo,train,lora} ...`. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import sys

from .errors import ZitError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own sub-parser."""
    from .lora import commands as lora_commands

    parser = argparse.ArgumentParser(prog="python -m trainer", description="Z-Image-Turbo LoRA engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,lora}")
    demo = sub.add_parser("demo", help="run the embedded demo on generated files")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.set_defaults(func=_run_demo)
    lora_commands.add_parser(sub)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .lora.demo import run_demo

    run_demo(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse and run; ZitError and missing files become `error: ...` on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ZitError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

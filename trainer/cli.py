"""The command line: `python -m trainer {demo,train,lora} ...`. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import sys

from .config_fields import FIELDS
from .errors import ZitError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own sub-parser."""
    from .lora import commands as lora_commands

    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Z-Image-Turbo LoRA engine: train LoRAs, plan their GPU memory, and inspect, convert, "
                    "scale and merge LoRA files. Documentation: docs/README.md in the zit-trainer folder.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,config,plan,lora}")
    demo = sub.add_parser("demo", help="train the tiny built-in model on a generated dataset (CPU, ~1 min)")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=120, help="training steps (default: %(default)s)")
    demo.set_defaults(func=_run_demo)
    train = sub.add_parser("train", help="train a LoRA from a TOML config",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train a LoRA from a TOML config; `python -m trainer config` prints "
                                       "one with every\ndefault. Ctrl+C stops after saving a checkpoint.\n\n"
                                       + _settings_help())
    train.add_argument("--config", required=True, help="the run's TOML file (see `config`)")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.set_defaults(func=_run_train)
    config = sub.add_parser("config", help="print a commented TOML config with every default",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            description="Print the training config as TOML: every setting with its default, "
                                        "what it does and its\nallowed values as comments.\n\n"
                                        + _settings_help())
    config.set_defaults(func=_print_config)
    plan = sub.add_parser("plan", help="predict a config's peak GPU memory per memory plan and pick the one "
                                       "that fits (nothing loads)",
                          description="Predict a config's peak GPU memory for each memory plan "
                                      f"(model.memory: {', '.join(FIELDS['model.memory'].choices)}) and "
                                      "pick the one that fits; nothing is loaded. See docs/memory.md.")
    plan.add_argument("--config", required=True, help="the run's TOML file")
    plan.add_argument("--vram", help="memory budget, e.g. 12GB (default: model.vram, else the free memory "
                                     "of the GPU)")
    plan.add_argument("--card", help="comma-separated card sizes, e.g. 8GB,12GB,16GB,24GB: each one's plan")
    plan.add_argument("--text-tokens", type=int, default=512,
                      help="caption tokens to plan for (default: %(default)s, the text encoder's maximum)")
    plan.set_defaults(func=_run_plan)
    lora_commands.add_parser(sub)
    return parser


def _settings_help() -> str:
    """The config settings that take one of a fixed set of values, with those values (for --help)."""
    lines = ["settings with a fixed set of values (section.key: allowed values):"]
    lines += [f"  {spec.dotted}: {', '.join(spec.choices)}" for spec in FIELDS.values() if spec.choices]
    lines.append("every setting, its default and allowed values: docs/training.md in the zit-trainer folder")
    return "\n".join(lines)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, args.steps)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)  # a bad config is refused before torch and diffusers are imported
    from .distributed import DistributedError, start_processes, stop_on_launcher_signal
    from .job import JobRunner
    from .loop import train
    from .progress import ProgressPrinter

    processes = start_processes()  # accelerate launch / torchrun: join the others (alone: no-op)
    if processes.parallel:
        stop_on_launcher_signal(processes.rank)
    runner = JobRunner()
    if processes.is_main:
        runner.subscribe(ProgressPrinter(sys.stderr))
    job = runner.start("train", lambda ctx: train(cfg, ctx, resume=args.resume, processes=processes))
    try:
        while not job.wait(0.5):
            pass
    except KeyboardInterrupt:
        if processes.is_main:
            print("\nstopping: saving a checkpoint (Ctrl+C again to abort)", file=sys.stderr)
        job.stop()
        job.wait()
    processes.close()
    if job.error:
        # process 0 speaks for the job; another process only for a failure of its own
        if processes.is_main or not isinstance(job.exception, DistributedError):
            where = f"process {processes.rank}: " if processes.rank else ""
            print(f"error: {where}{job.error}", file=sys.stderr)
        return 2 if isinstance(job.exception, ZitError) else 1
    if processes.is_main:
        print(f"LoRA: {job.result.lora_path} (step {job.result.step})")
        if job.result.losses:
            print(f"loss and turbo-health curves: {job.result.lora_path.parent / 'loss.png'}")
    return 0


def _print_config(args: argparse.Namespace) -> int:
    from .config import TrainConfig, config_to_toml

    print(config_to_toml(TrainConfig()))
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    if args.text_tokens < 1:
        raise ZitError(f"--text-tokens {args.text_tokens}: must be >= 1")
    from . import memory

    # bad sizes are refused before the transformer's headers are read
    cards = [(c.strip(), memory.parse_vram(c.strip(), "--card")) for c in (args.card or "").split(",") if c]
    if args.vram:
        budget, source = memory.parse_vram(args.vram), f"--vram {args.vram}"
    elif cfg.model.vram:
        budget, source = memory.parse_vram(cfg.model.vram, "model.vram ="), f"model.vram = {cfg.model.vram!r}"
    else:
        budget, source = None, "free on the GPU"
    spec = memory.transformer_spec(cfg)
    if cards:
        print(memory.card_report(cfg, spec, cards, text_tokens=args.text_tokens))
        return 0
    if budget is None:
        budget = memory.free_vram("cuda")
    try:
        print(memory.plan_report(cfg, spec, budget, source, text_tokens=args.text_tokens))
    except memory.MemoryPlanError as exc:
        print(exc.report)  # the table of what was tried; main prints the one-line error
        raise
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

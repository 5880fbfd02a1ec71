"""The command line: `python -m trainer {demo,train,lora} ...`. Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from .config_fields import FIELDS
from .errors import ZitError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line refusal: `error: <command>: <problem> (see --help)`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each command module adds its own sub-parser."""
    from .lora import commands as lora_commands

    parser = Parser(
        prog="python -m trainer",
        description="Z-Image-Turbo LoRA engine: train LoRAs, plan their GPU memory, and inspect, convert, "
                    "scale and merge LoRA files. Documentation: docs/README.md in the zit-trainer folder.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,train,config,plan,lora}")
    demo = sub.add_parser("demo", help="train the tiny built-in model on a generated dataset (CPU, ~1 min)")
    demo.add_argument("-o", "--output", "--out", dest="out", default="demo_output",
                      help="output folder, missing or empty (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    demo.set_defaults(func=_run_demo)
    train = sub.add_parser("train", help="train a LoRA from a TOML config",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Train a LoRA from a TOML config; `python -m trainer config` prints "
                                       "one with every\ndefault. Ctrl+C stops after saving a checkpoint.\n\n"
                                       + _settings_help())
    train.add_argument("--config", required=True, help="the run's TOML file (see `config`)")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="train again in a run folder that holds a run of the same save.name (its files "
                            "are replaced as the new run saves)")
    train.add_argument("--comfyui", metavar="PATH",
                       help="a ComfyUI checkout whose Qwen tokenizer serves a single-file text encoder (e.g. "
                            "qwen_3_4b.safetensors) without a tokenizer folder beside it (default: "
                            "COMFYUI_PATH, else the ComfyUI this pack is installed in)")
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
    lora_demo = lora_commands.add_parser(sub).add_parser(
        "demo", help="generate two LoRAs and run every tool on them")
    lora_demo.add_argument("-o", "--output", "--out", dest="out", default="demo_output",
                           help="output folder, missing or empty (default: %(default)s)")
    lora_demo.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    lora_demo.set_defaults(func=_run_lora_demo)
    return parser


def _settings_help() -> str:
    """The config settings that take one of a fixed set of values, with those values (for --help)."""
    lines = ["settings with a fixed set of values (section.key: allowed values):"]
    lines += [f"  {spec.dotted}: {', '.join(spec.choices)}" for spec in FIELDS.values() if spec.choices]
    lines.append("every setting, its default and allowed values: docs/training.md in the zit-trainer folder")
    return "\n".join(lines)


def _run_demo(args: argparse.Namespace) -> int:
    from .files import check_folder

    if args.steps < 1:
        raise ZitError(f"--steps {args.steps}: must be at least 1")
    check_folder(args.out, overwrite=args.overwrite)
    from .demo import run_demo

    run_demo(args.out, args.steps)
    return 0


def _run_lora_demo(args: argparse.Namespace) -> int:
    from .files import check_folder

    check_folder(args.out, overwrite=args.overwrite)
    from .lora.demo import run_demo

    run_demo(args.out, overwrite=args.overwrite)
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)  # a bad config is refused before torch and diffusers are imported
    from .preflight import check_run

    check_run(cfg, resume=args.resume, overwrite=args.overwrite)  # the files it names, the folders it writes
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui  # read by run_models.comfyui_checkout
    from .tensorboard_log import check_tensorboard, tensorboard_dir

    check_tensorboard(cfg)  # log.tensorboard without the package: refused before anything loads
    from .cli_job import NewFolders, SetupLines, one_line, wait_for
    from .distributed import DistributedError, start_processes, stop_on_launcher_signal
    from .job import JobRunner
    from .loop import train
    from .progress import attach_listeners

    processes = start_processes()  # accelerate launch / torchrun: join the others (alone: no-op)
    if processes.parallel:
        stop_on_launcher_signal(processes.rank)
    runner = JobRunner()
    setup, created = SetupLines(sys.stderr), NewFolders(cfg.run_dir)
    runner.subscribe(setup.listener)  # the run's lines wait until it is past its early checks
    if processes.is_main:
        attach_listeners(runner, cfg, setup.held)  # the progress bar or lines, and TensorBoard
    job = runner.start("train", lambda ctx: train(cfg, ctx, resume=args.resume, processes=processes))
    try:
        interrupted = wait_for(job, speak=processes.is_main)
    finally:
        setup.finish(refused=isinstance(job.exception, ZitError))
    processes.close()
    if job.error:
        if processes.is_main:
            created.remove_if_empty()
        # process 0 speaks for the job; another process only for a failure of its own
        if processes.is_main or not isinstance(job.exception, DistributedError):
            where = f"process {processes.rank}: " if processes.rank else ""
            print(f"error: {where}{one_line(job.error)}", file=sys.stderr)
        return 2 if isinstance(job.exception, ZitError) else 1
    if processes.is_main:
        print(f"LoRA: {job.result.lora_path} (step {job.result.step})")
        if job.result.losses:
            print(f"loss and turbo-health curves: {job.result.lora_path.parent / 'loss.png'}")
        if cfg.log.tensorboard:
            print(f"TensorBoard: tensorboard --logdir {tensorboard_dir(cfg)}")
    return 130 if interrupted else 0


def _print_config(args: argparse.Namespace) -> int:
    from .config import TrainConfig, config_to_toml

    print(config_to_toml(TrainConfig()))
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    if args.text_tokens < 1:
        raise ZitError(f"--text-tokens {args.text_tokens}: must be >= 1")
    from . import memory, memory_report

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
        print(memory_report.card_report(cfg, spec, cards, text_tokens=args.text_tokens))
        return 0
    if budget is None:
        budget = memory.free_vram("cuda")
    try:
        print(memory_report.plan_report(cfg, spec, budget, source, text_tokens=args.text_tokens))
    except memory.MemoryPlanError as exc:
        print(exc.report)  # the table of what was tried; main prints the one-line error
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse and run; bad input (ZitError, a file that cannot be read or written) becomes one line
    `error: ...` on stderr and exit code 2; Ctrl+C exits 130."""
    from .cli_job import one_line
    from .files import describe_os_error

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ZitError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130

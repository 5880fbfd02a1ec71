"""`python -m trainer lora {inspect,convert,scale,merge,demo}`: the LoRA tools on the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `lora` command and its sub-commands."""
    from .formats import DIALECTS

    lora = sub.add_parser("lora", help="inspect, convert, scale and merge ZIT LoRAs")
    cmds = lora.add_subparsers(dest="lora_command", required=True,
                               metavar="{inspect,convert,scale,merge,demo}")

    p = cmds.add_parser("inspect", help="norm and effective rank of dW per block and component")
    p.add_argument("file")
    p.add_argument("--dialect", choices=DIALECTS, help="skip detection and read as this dialect")
    p.add_argument("--heatmap", metavar="PNG", help="also write a blocks x components heatmap")
    p.add_argument("--metric", choices=("norm", "erank"), default="norm", help="heatmap metric")
    p.set_defaults(func=cmd_inspect)

    p = cmds.add_parser("convert", help="rewrite a LoRA in another dialect (same dW)")
    p.add_argument("input")
    p.add_argument("output")
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_convert)

    p = cmds.add_parser("scale", help="weight a LoRA per block and component (replaces modify_zlora.py)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--ratio", type=float, required=True, help="overall multiplier")
    _add_weight_args(p)
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_scale)

    p = cmds.add_parser("merge", help="merge N LoRAs exactly (concatenated factors) or by SVD")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--ratio", type=float, action="append", help="per input, in order (or once for all)")
    p.add_argument("--blocks", action="append", help="per input, in order (or once for all)")
    p.add_argument("--components", action="append", help="per input, in order (or once for all)")
    p.add_argument("--mode", choices=("exact", "svd"), default="exact")
    p.add_argument("--rank", type=int, help="svd: target rank")
    p.add_argument("--energy", type=float, help="svd: keep this fraction of the squared singular values")
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_merge)

    p = cmds.add_parser("demo", help="generate two LoRAs and run every tool on them")
    p.add_argument("--out", default="demo_output")
    p.set_defaults(func=lambda a: _demo(a.out))


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", default="all",
                   help="preset name, 35/34/31/30/1-value vector (BASE,L00..L29,NR0,NR1,CR0,CR1) "
                        "or ranges like '%%default=1,L10-19=0.5,NR=0'")
    p.add_argument("--components", default="", help="multipliers such as 'adaLN=0,q=0.5' (unlisted = 1)")


def _add_output_args(p: argparse.ArgumentParser, dialects: tuple[str, ...]) -> None:
    p.add_argument("--from", dest="dialect", choices=dialects, help="input dialect (default: detect)")
    p.add_argument("--to", choices=dialects, default="aitoolkit", help="output dialect (default: aitoolkit)")
    p.add_argument("--dtype", choices=DTYPES, help="output dtype (default: keep the input's)")


def _dtype(name: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .formats import read_lora
    from .inspect import heatmap_png, stats_table

    lora = read_lora(args.file, dialect=args.dialect)
    ranks = sorted(lora.ranks())
    print(f"{args.file}: {lora.metadata.get('zit.format', '?')} dialect, {len(lora)} modules, "
          f"rank {'/'.join(map(str, ranks))}, {lora.num_parameters():,} parameters")
    print(stats_table(lora))
    if args.heatmap:
        heatmap_png(lora, args.heatmap, metric=args.metric)
        print(f"heatmap written to {args.heatmap}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import read_lora, write_lora

    lora = read_lora(args.input, dialect=args.dialect)
    write_lora(lora, args.output, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{args.output}: {len(lora)} modules written as {args.to}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from .blocks import apply_weights, resolve
    from .formats import read_lora, write_lora

    weights = resolve(args.blocks, args.components, args.ratio)
    lora = apply_weights(read_lora(args.input, dialect=args.dialect), weights)
    write_lora(lora, args.output, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{args.output}: {len(lora)} modules, blocks {weights.vector_string()}, "
          f"components {weights.components_string()}, ratio {args.ratio:g}")
    return 0


def _per_input(values: list | None, n: int, default, flag: str) -> list:
    from ..errors import ZitError

    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ZitError(f"{flag} given {len(values)} times for {n} inputs: give it once or once per input")
    return values


def cmd_merge(args: argparse.Namespace) -> int:
    from ..errors import ZitError
    from .blocks import resolve
    from .formats import read_lora, write_lora
    from .merge import merge_exact, merge_svd

    n = len(args.inputs)
    ratios = _per_input(args.ratio, n, 1.0, "--ratio")
    blocks = _per_input(args.blocks, n, "all", "--blocks")
    comps = _per_input(args.components, n, "", "--components")
    if args.mode == "exact" and (args.rank or args.energy):
        raise ZitError("--rank/--energy need --mode svd")
    if args.mode == "svd" and (args.rank is None) == (args.energy is None):
        raise ZitError("--mode svd needs exactly one of --rank or --energy")
    items = []
    for i, path in enumerate(args.inputs):
        _say(f"[{i + 1}/{n}] reading {path}")
        lora = read_lora(path, dialect=args.dialect)
        lora.metadata.setdefault("zit.name", Path(path).stem)
        items.append((lora, resolve(blocks[i], comps[i], ratios[i])))
    if args.mode == "exact":
        merged = merge_exact(items)
    else:
        merged, reports = merge_svd(items, rank=args.rank, energy=args.energy)
        worst = max(reports.values(), key=lambda r: r.rel_error)
        print(f"svd: worst relative error {worst.rel_error:.4g}, "
              f"mean kept energy {sum(r.energy for r in reports.values()) / len(reports):.4f}")
    write_lora(merged, args.output, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{args.output}: {len(merged)} modules, rank {'/'.join(map(str, sorted(merged.ranks())))}")
    return 0


def _demo(out: str) -> int:
    from .demo import run_demo

    run_demo(out)
    return 0

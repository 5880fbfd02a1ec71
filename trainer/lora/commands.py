"""`python -m trainer lora {inspect,convert,scale,merge,demo}`: the LoRA tools on the command line.

Every command also reads LyCORIS files (LoKr, LoHa, full diff): `inspect` shows them as they are;
`convert`, `scale` and `merge` turn them into LoRAs by SVD at `--rank N` and/or `--energy F` first and
print the relative error per module (worst modules and the mean).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `lora` command and its sub-commands."""
    from .formats import DIALECTS

    lora = sub.add_parser("lora", help="inspect, convert, scale and merge ZIT LoRAs",
                          description="Inspect, convert, scale and merge Z-Image LoRAs of any dialect "
                                      f"({', '.join(DIALECTS)}) and LyCORIS files. See docs/dialects.md and "
                                      "docs/block_weights.md in the zit-trainer folder.")
    cmds = lora.add_subparsers(dest="lora_command", required=True,
                               metavar="{inspect,convert,scale,merge,demo}")

    p = cmds.add_parser("inspect", help="norm and effective rank of dW per block and component")
    p.add_argument("file")
    p.add_argument("--dialect", choices=DIALECTS, help="skip detection and read as this dialect")
    p.add_argument("--heatmap", metavar="PNG", help="also write a blocks x components heatmap")
    p.add_argument("--metric", choices=("norm", "erank"), default="norm",
                   help="heatmap metric: norm = Frobenius norm of dW, erank = its effective rank "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_inspect)

    p = cmds.add_parser("convert", help="rewrite a LoRA in another dialect (same dW); a LoKr/LoHa/diff file "
                                        "becomes a LoRA by SVD (--rank/--energy)")
    p.add_argument("input")
    p.add_argument("output")
    _add_target_args(p)
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_convert)

    p = cmds.add_parser("scale", help="weight a LoRA per block and component")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--ratio", type=float, required=True, help="overall multiplier")
    _add_weight_args(p)
    _add_target_args(p)
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_scale)

    p = cmds.add_parser("merge", help="merge N LoRAs exactly (concatenated factors) or by SVD")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--ratio", type=float, action="append", help="per input, in order (or once for all)")
    p.add_argument("--blocks", action="append",
                   help="per input, in order (or once for all): " + _blocks_help())
    p.add_argument("--components", action="append",
                   help="per input, in order (or once for all): " + _components_help())
    p.add_argument("--mode", choices=("exact", "svd"), default="exact",
                   help="exact: concatenated factors, dW is exactly the weighted sum (rank = sum of ranks); "
                        "svd: that sum truncated to --rank or --energy (default: %(default)s)")
    p.add_argument("--rank", type=int, help="svd: target rank; also the rank LoKr/LoHa/diff inputs are "
                                            "converted to")
    p.add_argument("--energy", type=float, help="svd: keep this fraction of the squared singular values; "
                                                "also for converting LoKr/LoHa/diff inputs")
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_merge)

    p = cmds.add_parser("demo", help="generate two LoRAs and run every tool on them")
    p.add_argument("--out", default="demo_output")
    p.set_defaults(func=lambda a: _demo(a.out))


def _add_weight_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", default="all", help=_blocks_help() + " (default: %(default)s)")
    p.add_argument("--components", default="", help=_components_help())


def _blocks_help() -> str:
    """--blocks help: the three forms, with every preset name."""
    from .blocks import PRESETS

    return (f"block weights: a preset ({', '.join(PRESETS)}), a comma vector of 1, 30, 31, 34 or 35 values "
            "(BASE,L00..L29,NR0,NR1,CR0,CR1) or assignments like '%%default=1,L10-19=0.5,NR=0' "
            "(see docs/block_weights.md)")


def _components_help() -> str:
    """--components help: every component and group name."""
    from .spec import COMPONENTS

    return (f"component multipliers over {', '.join(COMPONENTS)} and the groups attn, qkv, ffn, "
            "e.g. 'adaLN=0,q=0.5' (unlisted = 1)")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, help="LoKr/LoHa/diff input: SVD to this rank per module")
    p.add_argument("--energy", type=float, help="LoKr/LoHa/diff input: per module, the least rank keeping "
                                                "this fraction (0<F<=1) of sum s^2 (with --rank: smaller)")


def _add_output_args(p: argparse.ArgumentParser, dialects: tuple[str, ...]) -> None:
    p.add_argument("--from", dest="dialect", choices=dialects, help="input dialect (default: detect)")
    p.add_argument("--to", choices=dialects, default="aitoolkit", help="output dialect (default: aitoolkit)")
    p.add_argument("--dtype", choices=DTYPES, help="output dtype (default: keep the input's; float32 for a "
                                                   "LoKr/LoHa/diff input)")


def _dtype(name: str | None):
    import torch

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read(path: str, args: argparse.Namespace, target: bool = True):
    """The input as a LoRA: a LyCORIS file converted by SVD (its error report printed), a LoRA as it is."""
    from .any_file import error_report, read_any, to_lora

    item = read_any(path, dialect=args.dialect)
    rank, energy = (args.rank, args.energy) if target else (None, None)
    lora, errors = to_lora(item, path, rank, energy)
    if errors is not None:
        print(error_report(item, lora, errors, rank, energy))
    return lora


def cmd_inspect(args: argparse.Namespace) -> int:
    from .any_file import delta_stats, describe, read_any
    from .inspect import heatmap_png, stats_table
    from .lycoris import DeltaFile

    item = read_any(args.file, dialect=args.dialect)
    if isinstance(item, DeltaFile):
        stats = delta_stats(item)
        print(describe(item))
        print()
        print(stats_table(stats, item.spec, rank_label="numerical rank of dW"))
        if args.heatmap:
            heatmap_png(stats, args.heatmap, metric=args.metric, spec=item.spec)
            print(f"heatmap written to {args.heatmap}")
        return 0
    lora = item
    ranks = sorted(lora.ranks())
    print(f"{args.file}: {lora.metadata.get('zit.format', '?')} dialect, {len(lora)} modules, "
          f"rank {'/'.join(map(str, ranks))}, {lora.num_parameters():,} parameters")
    print(stats_table(lora))
    if args.heatmap:
        heatmap_png(lora, args.heatmap, metric=args.metric)
        print(f"heatmap written to {args.heatmap}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .any_file import check_target
    from .formats import write_lora

    check_target(args.rank, args.energy)
    lora = _read(args.input, args)
    write_lora(lora, args.output, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{args.output}: {len(lora)} modules written as {args.to}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from .any_file import check_target
    from .blocks import apply_weights, resolve
    from .formats import write_lora

    check_target(args.rank, args.energy)
    weights = resolve(args.blocks, args.components, args.ratio)
    lora = apply_weights(_read(args.input, args), weights)
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
    from .any_file import TARGET_HINT, check_target, file_is_lycoris
    from .blocks import resolve
    from .formats import write_lora
    from .merge import merge_exact, merge_svd

    n = len(args.inputs)
    ratios = _per_input(args.ratio, n, 1.0, "--ratio")
    blocks = _per_input(args.blocks, n, "all", "--blocks")
    comps = _per_input(args.components, n, "", "--components")
    lycoris = [path for path in args.inputs if file_is_lycoris(path)]
    target = args.rank is not None or args.energy is not None
    if args.mode == "exact" and target and not lycoris:
        raise ZitError("--rank/--energy need --mode svd (or a LoKr/LoHa/diff input to convert)")
    if args.mode == "exact" and lycoris and not target:
        raise ZitError(f"{lycoris[0]}: a LyCORIS (LoKr/LoHa/diff) file; {TARGET_HINT}")
    if args.mode == "svd" and (args.rank is None) == (args.energy is None):
        raise ZitError("--mode svd needs exactly one of --rank or --energy")
    check_target(args.rank, args.energy)
    items = []
    for i, path in enumerate(args.inputs):
        _say(f"[{i + 1}/{n}] reading {path}")
        lora = _read(path, args, target=path in lycoris)
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

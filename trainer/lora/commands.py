"""`python -m trainer lora {inspect,convert,scale,merge,demo}`: the LoRA tools on the command line.

Every command takes its input(s) first and its output with `-o/--output` (`convert` and `scale` also take
the older `IN OUT` form); no command writes over an existing file or one of its inputs without
`--overwrite`, and every check on the options and the output runs before any input is read.

Every command also reads LyCORIS files (LoKr, LoHa, full diff): `inspect` shows them as they are;
`convert`, `scale` and `merge` turn them into LoRAs by SVD at `--rank N` and/or `--energy F` first and
print the relative error per module (worst modules and the mean).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")
OUTPUT_HELP = "the file to write (refused when it exists or is an input, unless --overwrite)"


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register the `lora` command and its sub-commands; returns the sub-command action (the command line
    adds `demo` to it)."""
    from .formats import DIALECTS

    lora = sub.add_parser("lora", help="inspect, convert, scale and merge ZIT LoRAs",
                          description="Inspect, convert, scale and merge Z-Image LoRAs of any dialect "
                                      f"({', '.join(DIALECTS)}) and LyCORIS files. See docs/dialects.md and "
                                      "docs/block_weights.md in the zit-trainer folder.")
    cmds = lora.add_subparsers(dest="lora_command", required=True,
                               metavar="{inspect,convert,scale,merge,demo}")
    add_commands(cmds)
    return cmds


def lora_parser() -> argparse.ArgumentParser:
    """A parser of the `lora` sub-commands alone (what `python -m trainer lora` takes), for the demo."""
    parser = argparse.ArgumentParser(prog="python -m trainer lora")
    add_commands(parser.add_subparsers(dest="lora_command", required=True))
    return parser


def add_commands(cmds: argparse._SubParsersAction) -> None:
    """inspect, convert, scale and merge."""
    from .formats import DIALECTS

    p = cmds.add_parser("inspect", help="norm and effective rank of dW per block and component")
    p.add_argument("file")
    p.add_argument("--dialect", choices=DIALECTS, help="skip detection and read as this dialect")
    p.add_argument("--heatmap", metavar="PNG", help="also write a blocks x components heatmap")
    p.add_argument("--metric", choices=("norm", "erank"),
                   help="heatmap metric: norm = Frobenius norm of dW, erank = its effective rank "
                        "(default: norm; needs --heatmap)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --heatmap file")
    p.set_defaults(func=cmd_inspect)

    p = cmds.add_parser("convert", help="rewrite a LoRA in another dialect (same dW); a LoKr/LoHa/diff file "
                                        "becomes a LoRA by SVD (--rank/--energy)")
    p.add_argument("input")
    _add_output(p, legacy=True)
    _add_target_args(p)
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_convert)

    p = cmds.add_parser("scale", help="weight a LoRA per block and component")
    p.add_argument("input")
    _add_output(p, legacy=True)
    p.add_argument("--ratio", type=float, required=True, help="overall multiplier")
    _add_weight_args(p)
    _add_target_args(p)
    _add_output_args(p, DIALECTS)
    p.set_defaults(func=cmd_scale)

    p = cmds.add_parser("merge", help="merge N LoRAs exactly (concatenated factors) or by SVD")
    p.add_argument("inputs", nargs="+", metavar="input")
    _add_output(p, legacy=False)
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


def _add_output(p: argparse.ArgumentParser, legacy: bool) -> None:
    p.add_argument("-o", "--output", help=OUTPUT_HELP)
    if legacy:  # the older `IN OUT` form
        p.add_argument("legacy_output", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (even an input)")


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
    """Progress on stdout: stderr carries nothing but a refusal's one line."""
    print(text, flush=True)


def _read(path: str, args: argparse.Namespace, target: bool = True):
    """The input as a LoRA: a LyCORIS file converted by SVD (its error report printed), a LoRA as it is."""
    from .any_file import error_report, read_any, to_lora

    item = read_any(path, dialect=args.dialect)
    rank, energy = (args.rank, args.energy) if target else (None, None)
    lora, errors = to_lora(item, path, rank, energy)
    if errors is not None:
        print(error_report(item, lora, errors, rank, energy))
    return lora


def _output(args: argparse.Namespace, inputs: list[str]) -> str:
    """The output path (-o, or the older positional form), checked before any input is read."""
    from ..errors import ZitError
    from ..files import check_output

    legacy = getattr(args, "legacy_output", None)
    if args.output and legacy:
        raise ZitError(f"two outputs ({legacy} and -o {args.output}): give the output once, with -o/--output")
    out = args.output or legacy
    if not out:
        form = "IN1 IN2 ... -o OUT" if args.lora_command == "merge" else "IN -o OUT"
        raise ZitError(f"lora {args.lora_command}: no output file: the form is `lora {args.lora_command} "
                       f"{form}`" + (" (the output no longer comes first)" if args.lora_command == "merge"
                                     else ""))
    check_output(out, overwrite=args.overwrite, inputs=inputs)
    return out


def _check_ratios(ratios: list[float] | None) -> None:
    from ..errors import ZitError

    for ratio in ratios or []:
        if not math.isfinite(ratio):
            raise ZitError(f"--ratio {ratio}: must be a finite number")


def _check_options(args: argparse.Namespace) -> None:
    """--rank/--energy in range, before any file is read."""
    from .any_file import check_target

    check_target(args.rank, args.energy)


def _check_inputs(paths: list[str]) -> None:
    """Every input file exists and can be opened, before any is read (a folder is left to the reader)."""
    from ..files import check_readable

    for path in paths:
        if not Path(path).is_dir():
            check_readable(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..errors import ZitError
    from ..files import check_output
    from .any_file import delta_stats, describe, read_any
    from .inspect import heatmap_png, stats_table
    from .lycoris import DeltaFile

    if args.metric and not args.heatmap:
        raise ZitError(f"--metric {args.metric}: only used with --heatmap PNG")
    _check_inputs([args.file])
    if args.heatmap:
        check_output(args.heatmap, overwrite=args.overwrite, inputs=[args.file],
                     label=f"--heatmap {args.heatmap}")
    metric = args.metric or "norm"
    item = read_any(args.file, dialect=args.dialect)
    if isinstance(item, DeltaFile):
        stats = delta_stats(item)
        print(describe(item))
        print()
        print(stats_table(stats, item.spec, rank_label="numerical rank of dW"))
        if args.heatmap:
            heatmap_png(stats, args.heatmap, metric=metric, spec=item.spec)
            print(f"heatmap written to {args.heatmap}")
        return 0
    lora = item
    ranks = sorted(lora.ranks())
    print(f"{args.file}: {lora.metadata.get('zit.format', '?')} dialect, {len(lora)} modules, "
          f"rank {'/'.join(map(str, ranks))}, {lora.num_parameters():,} parameters")
    print(stats_table(lora))
    if args.heatmap:
        heatmap_png(lora, args.heatmap, metric=metric)
        print(f"heatmap written to {args.heatmap}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .writing import write_lora

    _check_options(args)
    out = _output(args, [args.input])
    _check_inputs([args.input])
    lora = _read(args.input, args)
    write_lora(lora, out, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{out}: {len(lora)} modules written as {args.to}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from .blocks import apply_weights, resolve
    from .writing import write_lora

    _check_ratios([args.ratio])
    _check_options(args)
    weights = resolve(args.blocks, args.components, args.ratio)
    out = _output(args, [args.input])
    _check_inputs([args.input])
    lora = apply_weights(_read(args.input, args), weights)
    write_lora(lora, out, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{out}: {len(lora)} modules, blocks {weights.vector_string()}, "
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
    from .any_file import TARGET_HINT, file_is_lycoris
    from .blocks import resolve
    from .merge import merge_exact, merge_svd
    from .writing import write_lora

    n = len(args.inputs)
    _check_ratios(args.ratio)
    ratios = _per_input(args.ratio, n, 1.0, "--ratio")
    blocks = _per_input(args.blocks, n, "all", "--blocks")
    comps = _per_input(args.components, n, "", "--components")
    weights = [resolve(blocks[i], comps[i], ratios[i]) for i in range(n)]
    target = args.rank is not None or args.energy is not None
    if args.mode == "svd" and (args.rank is None) == (args.energy is None):
        raise ZitError("--mode svd needs exactly one of --rank or --energy")
    _check_options(args)
    out = _output(args, args.inputs)
    _check_inputs(args.inputs)
    lycoris = [path for path in args.inputs if file_is_lycoris(path)]
    if args.mode == "exact" and target and not lycoris:
        raise ZitError("--rank/--energy with --mode exact: an exact merge keeps every rank; give --mode svd "
                       "(or a LoKr/LoHa/diff input to convert)")
    if args.mode == "exact" and lycoris and not target:
        raise ZitError(f"{lycoris[0]}: a LyCORIS (LoKr/LoHa/diff) file; {TARGET_HINT}")
    items = []
    for i, path in enumerate(args.inputs):
        _say(f"[{i + 1}/{n}] reading {path}")
        lora = _read(path, args, target=path in lycoris)
        lora.metadata.setdefault("zit.name", Path(path).stem)
        items.append((lora, weights[i]))
    if args.mode == "exact":
        merged = merge_exact(items)
    else:
        merged, reports = merge_svd(items, rank=args.rank, energy=args.energy)
        worst = max(reports.values(), key=lambda r: r.rel_error)
        print(f"svd: worst relative error {worst.rel_error:.4g}, "
              f"mean kept energy {sum(r.energy for r in reports.values()) / len(reports):.4f}")
    write_lora(merged, out, dialect=args.to, dtype=_dtype(args.dtype))
    print(f"{out}: {len(merged)} modules, rank {'/'.join(map(str, sorted(merged.ranks())))}")
    return 0

"""`python -m bridge slice`: its arguments, checked before PyTorch is imported, and its one-line report."""

from __future__ import annotations

import argparse
import os

from megatron_v4.runtime.command_line import UsageError

GATE_NORM, FIRST = "gate-norm", "first"
EXPERT_RULES = (GATE_NORM, FIRST)
SLICE_DTYPES = ("bf16", "source")


def layer_list(text: str) -> list[int]:
    """`--layers 0,2,5` -> [0, 2, 5]."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer numbers") from None


def add_parser(commands) -> argparse.ArgumentParser:
    """Register the `slice` subcommand on the CLI's subparsers."""
    sub = commands.add_parser("slice", help="a smaller DeepSeek-V4 cut out of a bigger one, with provenance")
    sub.add_argument("--hf", required=True, help="source checkpoint directory (any naming, FP8/FP4 read)")
    sub.add_argument("--config", required=True, help="config.json of the smaller model (either flavour)")
    sub.add_argument("--out", required=True, help="checkpoint directory to create (official naming)")
    sub.add_argument("--layers", type=layer_list,
                     help="source layer of each slice layer, e.g. 0,1,3,5 (default: an even stride)")
    sub.add_argument("--experts", default=GATE_NORM,
                     help="gate-norm (largest gate rows, default), first, or a JSON file of source expert ids "
                          "(a list, or {\"layers.N\": [...], \"mtp.0\": [...]})")
    sub.add_argument("--seed", type=int, default=0, help="seed of the INIT tensors")
    sub.add_argument("--dtype", choices=SLICE_DTYPES, default="bf16",
                     help="bf16 (default; fp32 where the releases keep fp32) or each tensor's source format")
    sub.add_argument("--max-shard-gb", type=float, default=1.0, help="safetensors shard size (default 1 GB)")
    sub.add_argument("--force", action="store_true", help="replace --out if it exists")
    sub.add_argument("--quiet", action="store_true", help="no progress line")
    return sub


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.config):
        raise UsageError(f"--config {args.config}: no such file")
    if args.experts not in EXPERT_RULES and not os.path.isfile(args.experts):
        raise UsageError(f"--experts {args.experts}: neither {' nor '.join(EXPERT_RULES)} nor an existing file")
    from bridge.slice_checkpoint import slice_checkpoint

    report = slice_checkpoint(args.hf, args.config, args.out, args.layers, args.experts, args.seed, args.dtype,
                              args.force, int(args.max_shard_gb * 1e9), progress=not args.quiet)
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts.items())
    print(f"sliced {sum(report.counts.values())} tensors ({counts}) from source layers {report.layers} "
          f"in {report.seconds:.1f} s -> {args.out}")
    return 0

"""`python -m bridge import|export|verify`: convert DeepSeek-V4 checkpoints between Hugging Face and Megatron-Core.

    python -m bridge import --hf DIR --out DIR [--dtype bf16|fp32] [--workers N] [--force] [--allow-nonfinite]
    python -m bridge export --mcore DIR --out DIR [--dtype source|bf16] [--iteration N] [--workers N] [--force]
                            [--allow-nonfinite]
    python -m bridge verify --hf DIR --mcore DIR [--layers all|0,3] [--iteration N] [--sequences 3 --seq-len 48]
    python -m bridge slice --hf DIR --config SMALL.json --out DIR [--layers 0,2,..] [--experts gate-norm|first|FILE]

`--mcore` is an import output, or a `pretrain.py --save` directory (its latest iteration, or
`--iteration N`), or one of its `iter_*` directories.

Every failure is one line on stderr naming the file, tensor or key: exit code 2 for a usage
mistake, 1 for a failed conversion, 130 for Ctrl-C (`--verbose` or BRIDGE_DEBUG=1 shows the
traceback); a failed conversion leaves no output directory. `verify` exits with 3 when a
layer's outputs or the logits disagree, naming the first layer and tensor group that does. Arguments are checked before PyTorch and Megatron-Core are imported, `--out` among
them: an empty one, the current, home or root directory, or one overlapping an input is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

from bridge import slice_command
from bridge.output_dir import unsafe_target
from bridge.workers import default_workers
from megatron_v4.runtime.command_line import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ArgumentParser,
    UsageError,
    existing_directory,
    one_line,
)
from megatron_v4.runtime.quiet import verbose

IMPORT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
EXIT_MISMATCH = 3


def _verify_layers(text: str) -> list[int] | None:
    """`--layers` of verify: `all` -> None, else the layer numbers."""
    if text == "all":
        return None
    layers = slice_command.layer_list(text)
    if min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: layer numbers start at 0")
    return layers


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    imp = commands.add_parser("import", help="Hugging Face checkpoint -> Megatron-Core torch_dist checkpoint")
    imp.add_argument("--hf", required=True, help="checkpoint directory (config.json + safetensors, any naming)")
    imp.add_argument("--out", required=True, help="Megatron-Core checkpoint directory to create")
    imp.add_argument("--dtype", choices=sorted(IMPORT_DTYPES), default="bf16",
                     help="model weights dtype (fp32 source tensors always stay fp32); default bf16")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")

    exp = commands.add_parser("export", help="Megatron-Core checkpoint (from import) -> official safetensors")
    exp.add_argument("--mcore", required=True,
                     help="an `import` output (maybe trained since) or a pretrain.py --save directory")
    exp.add_argument("--iteration", type=int, help="with a --save directory: the iteration (default: latest)")
    exp.add_argument("--out", required=True, help="Hugging Face checkpoint directory to create")
    exp.add_argument("--dtype", choices=["source", "bf16"], default="source",
                     help="source: re-quantise every tensor to its original format (default); bf16: no FP8/FP4")
    exp.add_argument("--max-shard-gb", type=float,
                     help="safetensors shard size (default: the source's largest shard, else 1 GB)")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")

    ver = commands.add_parser("verify", help="transformers (HF checkpoint) vs Megatron-Core (imported), layer by layer")
    ver.add_argument("--hf", required=True)
    ver.add_argument("--mcore", required=True)
    ver.add_argument("--layers", type=_verify_layers, default=None,
                     help="all (default: every layer, then the logits) or the layers to compare, e.g. 0,3")
    ver.add_argument("--iteration", type=int, help="with a --save directory: the iteration (default: latest)")
    ver.add_argument("--sequences", type=int, default=3)
    ver.add_argument("--seq-len", type=int, default=48)
    ver.add_argument("--rtol", type=float,
                     help="a layer's outputs pass when max |diff| <= rtol * max |reference| (default 1e-2)")
    ver.add_argument("--min-cosine", type=float, default=0.999)
    ver.add_argument("--min-argmax", type=float, default=0.99, help="fraction of positions with the same argmax")

    for sub in (imp, exp, ver):
        sub.add_argument("--quiet", action="store_true", help="no progress line")
    for sub in (imp, exp):
        sub.add_argument("--workers", type=int, default=default_workers(),
                         help="threads converting and writing in parallel, each into its own files "
                              "(default: this machine's cores, here %(default)s); memory grows with them")
        sub.add_argument("--allow-nonfinite", action="store_true",
                         help="convert weights holding NaN or Inf (refused by default, naming the tensor)")
    slice_command.add_parser(commands)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "slice":
        return slice_command.run(args)
    # After the argument checks: importing PyTorch, Megatron-Core and transformers takes seconds.
    import torch

    from bridge import convert

    if args.command == "import":
        dtype = getattr(torch, IMPORT_DTYPES[args.dtype])
        report = convert.import_checkpoint(args.hf, args.out, dtype, args.force,
                                           progress=not args.quiet, allow_nonfinite=args.allow_nonfinite,
                                           workers=args.workers)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.quantised.items()))
        print(f"imported {report.tensors} tensors ({kinds}; {report.naming} naming), "
              f"{report.source_bytes / 1e9:.3f} GB in {report.seconds:.1f} s -> {args.out}")
        if report.carried:
            print(f"carried {report.carried} tensors of parts this bridge does not build (draft head, vision "
                  "encoder) byte for byte; export writes them back, nothing here trains or runs them")
        return 0
    if args.command == "export":
        report = convert.export_checkpoint(args.mcore, args.out, args.dtype, args.force,
                                           max_shard_bytes=None if args.max_shard_gb is None else int(args.max_shard_gb * 1e9), progress=not args.quiet,
                                           iteration=args.iteration, allow_nonfinite=args.allow_nonfinite,
                                           workers=args.workers)
        print(f"exported {report.tensors} tensors ({report.quantised_tensors} re-quantised, "
              f"{report.fresh_scale_blocks} blocks with a fresh scale), {report.written_bytes / 1e9:.3f} GB "
              f"in {len(report.files)} file(s), {report.seconds:.1f} s -> {args.out}"
              + (f"; {report.carried} carried tensors written back unchanged" if report.carried else ""))
        return 0
    from bridge import verify

    report = verify.verify(args.hf, args.mcore, args.sequences, args.seq_len, iteration=args.iteration,
                           layers=args.layers, progress=not args.quiet)
    rtol = verify.DEFAULT_RTOL if args.rtol is None else args.rtol
    ok = report.passed(rtol, args.min_cosine, args.min_argmax)
    worst = max(report.comparisons, key=lambda c: c.relative)
    print(f"verify: {report.sequences}x{report.seq_len} tokens, {len(report.layers)} layer(s); largest max |diff| / "
          f"max |reference|: {worst.relative:.3g} ({worst.part})"
          + (f"; logits: min cosine {report.min_cosine:.6f}, argmax agreement {report.argmax_agreement:.4f}"
             if report.min_cosine is not None else "")
          + f"; peak RSS {report.peak_rss_bytes / 1e9:.2f} GB: {'OK' if ok else 'MISMATCH'}")
    failures = report.failures(rtol)
    if failures:
        first = failures[0]
        print(f"error: {first.part} differs (max |diff| {first.max_abs_diff:.3g}, max |reference| "
              f"{first.max_abs_reference:.3g}); check the tensors {first.tensors}", file=sys.stderr)
    return 0 if ok else EXIT_MISMATCH


def check_args(args: argparse.Namespace) -> None:
    """Mistakes answered before the heavy imports."""
    for flag in ("hf", "mcore"):
        if getattr(args, flag, None) is not None:
            existing_directory(getattr(args, flag), f"--{flag}", expect=None)
    out = getattr(args, "out", None)
    if out is not None:
        reason = unsafe_target(out, [p for p in (getattr(args, "hf", None), getattr(args, "mcore", None)) if p])
        if reason:
            raise UsageError(reason)
    if getattr(args, "workers", 1) < 1:
        raise UsageError(f"--workers {args.workers} must be >= 1")
    if getattr(args, "max_shard_gb", None) is not None and args.max_shard_gb <= 0:
        raise UsageError(f"--max-shard-gb {args.max_shard_gb} must be > 0")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (every failure is one line on stderr)."""
    args = _parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as e:  # incl. torch.distributed's CheckpointException, a BaseException
        if isinstance(e, SystemExit) or verbose() or os.environ.get("BRIDGE_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED

"""Pretrain (or continue training) DeepSeek-V4 with Megatron-Core: TP/SP, EP, PP and DP.

    python examples/pretrain.py                                  # tiny model, mock data, CPU, < 1 min
    torchrun --nproc-per-node 8 examples/pretrain.py --tp 2 --ep 4 --pp 2 \\
        --hf /models/DeepSeek-V4-Flash --data-path /data/corpus_text_document --seq-length 4096 ...

Model: the tiny test architecture (default), an architecture `config.json` (--arch), a Hugging Face
checkpoint's weights (--hf DIR, through the bridge), or a `torch_dist` checkpoint (--load DIR: one written
by `python -m bridge import`, or this script's --save directory, which resumes the run exactly: model,
optimizer, LR schedule, RNG and data position). Data: a prepared Megatron indexed dataset (--data-path
PREFIX of PREFIX.bin/.idx), a text or JSONL file tokenised with a Hugging Face tokenizer directory
(--text-file FILE --tokenizer DIR, or a byte-level tokenizer without --tokenizer), or mock data (default).

Training: Megatron-Core's DistributedDataParallel and distributed optimizer (Adam), bf16 on GPU and fp32
on CPU, the MTP loss, the aux-loss-free expert-bias updates (in `finalize_model_grads`), linear warmup
and cosine decay, gradient clipping.
"""

from __future__ import annotations

import os
import sys

from megatron_v4.runtime.command_line import (
    ArgumentParser,
    UsageError,
    check_world_size,
    existing_directory,
    read_json,
    run_main,
    world_size,
)


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="pretrain.py", description=__doc__)
    g = p.add_argument_group("parallel layout (world size = tp * pp * dp; ep divides dp * tp)")
    g.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size; > 1 turns on sequence parallelism (Megatron-Core's MoE needs it)")
    g.add_argument("--sp", action="store_true", help="sequence parallelism (implied by --tp > 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    g.add_argument("--moe-dispatcher", choices=["allgather", "alltoall"], default="alltoall",
                   help="Megatron-Core's MoE token dispatcher")

    g = p.add_argument_group("model")
    g.add_argument("--hf", help="start from this Hugging Face checkpoint's weights (through the bridge)")
    g.add_argument("--load", help="torch_dist checkpoint: a `bridge import` output or a --save directory (resumes)")
    g.add_argument("--arch", help="architecture config.json (official or transformers flavour) for random init")
    g.add_argument("--mtp-layers", type=int, help="MTP depth (default: the architecture's)")
    g.add_argument("--mtp-loss-scale", type=float, default=0.3, help="weight of the MTP loss")
    g.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-loss-free expert-bias step")
    g.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    g.add_argument("--recompute", action="store_true", help="full activation recompute of every layer")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", help="prefix of a Megatron indexed dataset (PREFIX.bin / PREFIX.idx)")
    g.add_argument("--text-file", help="plain text (documents split on blank lines) or JSONL with a 'text' field")
    g.add_argument("--tokenizer", help="Hugging Face tokenizer directory (--text-file default: UTF-8 bytes)")
    g.add_argument("--data-cache", help="where tokenised text and dataset indices go (default: beside the data;"
                   " mock data is not cached)")
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=4, help="a multiple of micro-batch-size * dp")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-iters", type=int, default=30)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--warmup-iters", type=int, default=5)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save", help="directory for periodic torch_dist checkpoints")
    g.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--exit-after", type=int, help="stop after this step (as if interrupted), saving first")
    g.add_argument("--log-interval", type=int, default=1)
    return check_args(p.parse_args(argv))


def check_args(args):
    """Mistakes a user makes, answered before PyTorch and Megatron-Core are imported."""
    check_world_size("examples/pretrain.py", tp=args.tp, pp=args.pp)
    if args.hf:
        existing_directory(args.hf, "--hf")
    if args.load:
        existing_directory(args.load, "--load", expect=None)
    if args.arch:
        read_json(args.arch, "--arch")
    if args.tokenizer:
        existing_directory(args.tokenizer, "--tokenizer", expect=None)
    if args.text_file and not os.path.isfile(args.text_file):
        raise UsageError(f"--text-file {args.text_file}: no such file")
    if args.data_path:
        missing = [args.data_path + ext for ext in (".bin", ".idx") if not os.path.isfile(args.data_path + ext)]
        if missing:
            raise UsageError(
                f"--data-path {args.data_path}: {' and '.join(missing)} not found; give the prefix of a "
                "Megatron indexed dataset (PREFIX.bin and PREFIX.idx), or --text-file FILE"
            )
    if args.data_path and args.text_file:
        raise UsageError("--data-path and --text-file both give the data; choose one")
    dp = world_size() // (args.tp * args.pp)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size * dp = "
            f"{args.micro_batch_size} * {dp}"
        )
    if not 0 <= args.warmup_iters < args.train_iters:
        raise UsageError(f"--warmup-iters {args.warmup_iters} must be below --train-iters {args.train_iters}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Train; returns the metrics of every step this run made (the same on every rank)."""
    args = parse_args(argv)
    # After the argument checks: importing PyTorch and Megatron-Core takes seconds.
    from megatron_v4.training.launch import pretrain

    return pretrain(args)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    run_main("pretrain.py", lambda: main(sys.argv[1:]))

"""Pretrain (or continue training) DeepSeek-V4 with Megatron-Core: TP/SP, CP, EP, PP and DP.

    python examples/pretrain.py                                  # tiny model, mock data, CPU, < 1 min
    torchrun --nproc-per-node 8 examples/pretrain.py --tp 2 --ep 4 --pp 2 \\
        --hf /models/DeepSeek-V4-Flash --data-path /data/corpus_text_document --seq-length 4096 ...

Model: the tiny test architecture (default), an architecture `config.json` (--arch), a Hugging Face
checkpoint's weights (--hf DIR, through the bridge), or a `torch_dist` checkpoint (--load DIR: one written
by `python -m bridge import`, or this script's --save directory, which resumes the run exactly: model,
optimizer, LR schedule, RNG and data position). Data: a prepared Megatron indexed dataset (--data-path
PREFIX of PREFIX.bin/.idx), a text or JSONL file tokenised with a Hugging Face tokenizer directory
(--text-file FILE --tokenizer DIR, or a byte-level tokenizer without --tokenizer), or mock data (default).
--pack-documents keeps the documents of an indexed dataset or text file apart inside each sample (their
end-of-document tokens divide it). --sft-data FILE fine-tunes on chats (JSONL, one {"messages": [...]} per
line), rendered with the checkpoint's chat template (or --chat-template FILE), with a loss on the assistant's
tokens only, whole conversations packed into rows of --seq-length tokens.

Training: Megatron-Core's DistributedDataParallel and optimizers (AdamW, distributed; or Muon for the
hidden weight matrices and AdamW for the rest, as DeepSeek-V4 trains: --optimizer muon / dist_muon), bf16
on GPU and fp32 on CPU, the MTP loss, the aux-loss-free expert-bias updates (in `finalize_model_grads`),
linear warmup and cosine decay, gradient clipping. --load DIR --finetune starts from a checkpoint's weights
with a fresh optimizer and schedule; --freeze / --freeze-file keep tensors fixed. Validation on a held-out
split (--eval-interval, --split), TensorBoard scalars and a JSON-lines metrics file.
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

OPTIMIZERS = ("adam", "muon", "dist_muon")


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(prog="pretrain.py", description=__doc__)
    g = p.add_argument_group("parallel layout (world size = tp * pp * cp * dp; ep divides dp * cp * tp)")
    g.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size; > 1 turns on sequence parallelism (Megatron-Core's MoE needs it)")
    g.add_argument("--sp", action="store_true", help="sequence parallelism (implied by --tp > 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    g.add_argument("--cp", "--context-parallel-size", dest="cp", type=int, default=1,
                   help="context parallel size: every sequence split into cp contiguous chunks")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    g.add_argument("--moe-dispatcher", choices=["allgather", "alltoall"], default="alltoall",
                   help="Megatron-Core's MoE token dispatcher")

    g = p.add_argument_group("model")
    g.add_argument("--hf", help="start from this Hugging Face checkpoint's weights (through the bridge)")
    g.add_argument("--load", help="torch_dist checkpoint: a `bridge import` output or a --save directory (resumes)")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: model weights only (new optimizer, LR schedule and step count); also how a"
                   " run switches optimizer")
    g.add_argument("--freeze", nargs="+", metavar="PATTERN",
                   help="freeze the parameters whose Megatron-Core names (one-rank numbering) match a glob or"
                   " regular expression, e.g. 'decoder.layers.*.mlp.experts.*'")
    g.add_argument("--freeze-file", metavar="FILE",
                   help="freeze the tensors of a JSON list of official DeepSeek-V4 names (e.g. frozen_keys.json)")
    g.add_argument("--arch", help="architecture config.json (official or transformers flavour) for random init")
    g.add_argument("--phase", choices=["dense", "indexer-warmup", "sparse"], default="sparse",
                   help="DeepSeek's training phases: dense (CSA layers attend to every visible compressed entry, "
                   "no indexer), indexer-warmup (dense attention, everything frozen but the lightning indexer, "
                   "which learns from the dense distillation loss), sparse (top-k attention, sparse indexer loss; "
                   "default)")
    g.add_argument("--indexer-loss-coeff", type=float,
                   help="weight of the indexer distillation loss (default: 0.01 sparse, 1.0 indexer-warmup, "
                   "0 dense; 0 without CSA layers)")
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
    g.add_argument("--pack-documents", action="store_true",
                   help="the end-of-document tokens of --data-path / --text-file divide each sample into documents"
                   " that attend and predict only within themselves (one packed row per micro batch)")
    g.add_argument("--sft-data", metavar="FILE",
                   help='chats to fine-tune on: JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line;'
                   " loss on the assistant's tokens only; conversations packed into rows of --seq-length tokens"
                   " (one packed row per micro batch)")
    g.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template for --sft-data (default: the tokenizer's; DeepSeek-V4's chat mode:"
                   " bridge/deepseek_v4_chat.jinja)")
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--micro-batch-size", type=int,
                   help="default 2; packed data (--pack-documents, --sft-data) takes 1 row per micro batch")
    g.add_argument("--global-batch-size", type=int, default=4, help="a multiple of micro-batch-size * dp")
    g.add_argument("--split", default="100,0,0",
                   help="train,valid,test weights dividing an indexed dataset's documents or the --sft-data"
                   " conversations (e.g. 98,2,0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-iters", type=int, default=30)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--warmup-iters", type=int, default=5)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="adam: AdamW (Megatron-Core's distributed optimizer); muon: Muon for the hidden weight"
                   " matrices, --muon-scalar-optimizer for the rest, as DeepSeek-V4 trains; dist_muon: the same,"
                   " layer-wise distributed over data-parallel ranks")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--muon-momentum", type=float, default=0.95)
    g.add_argument("--muon-nesterov", action="store_true", help="Nesterov momentum (off: B = mu B + (1 - mu) G)")
    g.add_argument("--muon-ns-steps", type=int, default=5, help="Newton-Schulz iterations")
    g.add_argument("--muon-coefficient-type", default="simple",
                   help="Newton-Schulz coefficients (emerging-optimizers' names): simple = (3.4445, -4.7750,"
                   " 2.0315) every step; deepseekv4 = 8 such steps then (2, -1.5, 0.5), with --muon-ns-steps 10")
    g.add_argument("--muon-scale-mode", choices=["spectral", "unit_rms_norm", "shape_scaling"], default="spectral",
                   help="update scale: spectral sqrt(max(m, n)), unit_rms_norm sqrt(m / n)")
    g.add_argument("--muon-extra-scale-factor", type=float, default=1.0, help="extra factor on Muon's update")
    g.add_argument("--muon-scalar-optimizer", choices=["adam", "lion"], default="adam",
                   help="optimizer of the non-matrix tensors under Muon (AdamW with --adam-* settings)")
    g.add_argument("--muon-fp32-matmul-prec", choices=["medium", "high", "highest"],
                   help="Newton-Schulz matmul precision (default: highest in fp32, medium = bf16 in bf16)")
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save", help="directory for periodic torch_dist checkpoints")
    g.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--exit-after", type=int, help="stop after this step (as if interrupted), saving first")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=0, help="steps between validations (0: none)")
    g.add_argument("--eval-iters", type=int, default=2, help="global batches per validation")
    g.add_argument("--tensorboard-dir", help="write TensorBoard scalars here (rank 0)")
    g.add_argument("--metrics-jsonl", help="append one JSON object per step and per validation to this file")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Mistakes a user makes, answered before PyTorch and Megatron-Core are imported."""
    check_world_size("examples/pretrain.py", tp=args.tp, pp=args.pp, cp=args.cp)
    if args.seq_length % (args.cp * (args.tp if args.sp or args.tp > 1 else 1)):
        raise UsageError(
            f"--seq-length {args.seq_length} is not divisible by cp * tp = {args.cp} * {args.tp} (context and "
            "sequence parallelism split it); choose a multiple"
        )
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
    if sum(bool(source) for source in (args.data_path, args.text_file, args.sft_data)) > 1:
        raise UsageError("--data-path, --text-file and --sft-data each give the data; choose one")
    if args.sft_data and not os.path.isfile(args.sft_data):
        raise UsageError(f"--sft-data {args.sft_data}: no such file")
    if args.chat_template and not args.sft_data:
        raise UsageError("--chat-template renders --sft-data; give --sft-data FILE too")
    if args.chat_template and not os.path.isfile(args.chat_template):
        raise UsageError(f"--chat-template {args.chat_template}: no such file")
    if args.pack_documents and not (args.data_path or args.text_file):
        raise UsageError("--pack-documents divides the documents of --data-path or --text-file; give one"
                         " (--sft-data packs conversations by itself)")
    packed = args.pack_documents or args.sft_data
    if args.micro_batch_size is None:
        args.micro_batch_size = 1 if packed else 2
    if packed and args.micro_batch_size != 1:
        raise UsageError(f"packed rows go one per micro batch (Megatron-Core's THD format): use --micro-batch-size 1"
                         f" (got {args.micro_batch_size}) and a longer --seq-length to pack more")
    dp = world_size() // (args.tp * args.pp * args.cp)
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size * dp = "
            f"{args.micro_batch_size} * {dp}"
        )
    if args.phase == "dense" and args.indexer_loss_coeff:
        raise UsageError("--phase dense runs no indexer; drop --indexer-loss-coeff or use --phase indexer-warmup")
    if args.indexer_loss_coeff is not None and args.indexer_loss_coeff < 0:
        raise UsageError(f"--indexer-loss-coeff {args.indexer_loss_coeff} must be >= 0")
    if args.finetune and not args.load:
        raise UsageError("--finetune needs --load DIR (the checkpoint whose weights to start from)")
    if args.freeze_file:
        names = read_json(args.freeze_file, "--freeze-file")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError(f"--freeze-file {args.freeze_file}: expected a JSON list of official tensor names")
    split = args.split.split(",")
    if len(split) != 3 or not all(part.strip().replace(".", "", 1).isdigit() for part in split):
        raise UsageError(f"--split {args.split}: expected three weights train,valid,test (e.g. 98,2,0)")
    if args.eval_interval < 0 or args.eval_iters < 1:
        raise UsageError("--eval-interval must be >= 0 and --eval-iters >= 1")
    if args.eval_interval and (args.data_path or args.text_file or args.sft_data) and not float(split[1]):
        raise UsageError(f"--eval-interval needs a validation share in --split (got {args.split}; e.g. 98,2,0)")
    if args.muon_ns_steps < 1:
        raise UsageError(f"--muon-ns-steps {args.muon_ns_steps} must be at least 1")
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

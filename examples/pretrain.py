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

import argparse
import logging
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

import megatron_v4
from megatron_v4 import training

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p.parse_args(argv)


# --- set-up ----------------------------------------------------------------------------------------------
def architecture(args):
    """The architecture (a `bridge.DeepSeekV4HFConfig`) and the checkpoint to load model weights from."""
    from bridge import read_hf_config
    from bridge.tiny import TINY

    if args.hf:
        return read_hf_config(args.hf), None
    if args.load:
        resume = training.latest_checkpoint(args.load)
        return training.read_architecture(resume or args.load), resume or args.load
    if args.arch:
        return read_hf_config(args.arch), None
    return TINY, None


def model_config(args, arch, layout):
    name = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    mtp = args.mtp_layers
    if mtp is None and args.load and not training.latest_checkpoint(args.load):
        mtp = training.checkpoint_mtp_layers(args.load)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return training.transformer_config(
        arch,
        dtype,
        mtp_num_layers=mtp,
        mtp_loss_scaling_factor=args.mtp_loss_scale,
        moe_router_bias_update_rate=args.bias_update_rate,
        moe_token_dispatcher_type=args.moe_dispatcher,
        **(recompute if args.recompute else {}),
    )


def dataset(args, order: training.DataOrder, vocab_size: int):
    num_samples = args.train_iters * order.global_batch_size
    cache = args.data_cache
    if args.tokenizer:
        tokenizer = training.HFTokenizer(args.tokenizer)
    elif args.text_file:
        tokenizer = training.ByteTokenizer()
    else:  # prepared or mock data: only the vocabulary size and an end-of-document id matter
        tokenizer = training.VocabTokenizer(vocab_size)
    if args.text_file:
        cache = cache or os.path.dirname(os.path.abspath(args.text_file))
        name = os.path.splitext(os.path.basename(args.text_file))[0] + "_tokens"
        prefix = training.tokenise_to_indexed(args.text_file, tokenizer, os.path.join(cache, name))
        kind = "indexed"
    else:
        prefix, kind = args.data_path, "indexed" if args.data_path else "mock"
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
            "use a model with a larger vocab_size (--arch) or a smaller tokenizer"
        )
    return training.build_dataset(kind, num_samples, args.seq_length, tokenizer, args.seed, prefix, cache)


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- training --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    """Train; returns the metrics of every step this run made (the same on every rank)."""
    args = parse_args(argv)
    sp = args.sp or args.tp > 1
    layout = megatron_v4.initialize(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, sp=sp, seed=args.seed)
    try:
        return _train(args, layout)
    finally:
        megatron_v4.destroy()


def _train(args, layout) -> list[dict]:
    if args.global_batch_size % (args.micro_batch_size * layout.dp):
        raise ValueError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of micro-batch-size * dp = "
            f"{args.micro_batch_size} * {layout.dp}"
        )
    if not 0 <= args.warmup_iters < args.train_iters:
        raise ValueError(f"--warmup-iters {args.warmup_iters} must be below --train-iters {args.train_iters}")
    order = training.DataOrder(
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.global_batch_size // (args.micro_batch_size * layout.dp),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=layout.dp,
    )
    arch, weights = architecture(args)
    config = model_config(args, arch, layout)
    model, bare = training.build_model(config)

    optimizer = training.build_optimizer(
        model,
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=args.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=True,
        ),
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style="cosine",
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    training.prepare_for_training(model, optimizer)

    start = 0
    resume = training.latest_checkpoint(args.load) if args.load else None
    if resume:
        common = training.load_checkpoint(resume, bare, optimizer, scheduler)
        start = common["step"]
        if dist.get_rank() == 0:
            log.info("resumed %s at step %d (%d samples consumed)", resume, start, common["consumed_samples"])
    elif args.load:
        training.load_model_weights(bare, args.load)
        optimizer.reload_model_params()
        if dist.get_rank() == 0:
            log.info("model weights from %s", args.load)
    elif args.hf:
        from bridge import AutoBridge

        AutoBridge.from_hf_pretrained(args.hf).load_hf_weights([bare])
        optimizer.reload_model_params()
        if dist.get_rank() == 0:
            log.info("model weights from %s", args.hf)

    data = dataset(args, order, config.vocab_size)
    stop = args.train_iters if args.exit_after is None else min(args.train_iters, args.exit_after)
    history = []
    model.train()
    for step in range(start, stop):
        began = time.perf_counter()
        metrics = training.train_step(model, optimizer, scheduler, data, order, step, args.seq_length)
        metrics.update(step=step + 1, seconds=time.perf_counter() - began)
        history.append(metrics)
        if dist.get_rank() == 0 and (step + 1) % args.log_interval == 0:
            mtp = "" if metrics["mtp_loss"] is None else f" | mtp loss {metrics['mtp_loss']:.4f}"
            log.info(
                "step %d/%d | loss %.4f%s | grad norm %.3f | lr %.2e | %.0f tokens/s | mem %.2f GB",
                step + 1, args.train_iters, metrics["loss"], mtp, metrics["grad_norm"],
                metrics["lr"], metrics["tokens"] / metrics["seconds"], memory_gb(),
            )
        done = step + 1
        periodic = args.save_interval and done % args.save_interval == 0
        if args.save and (periodic or done == stop):
            path = training.save_checkpoint(
                args.save, done, bare, optimizer, scheduler, arch, consumed_samples=done * order.global_batch_size
            )
            if dist.get_rank() == 0:
                log.info("saved %s", path)
    return history


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    main()

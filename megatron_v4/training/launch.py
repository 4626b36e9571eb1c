"""A DeepSeek-V4 training run as `examples/pretrain.py` launches it: the architecture and starting
weights (random, a Hugging Face checkpoint, a `bridge import` output, or a training checkpoint to
resume), Megatron-Core's DDP, distributed optimizer and LR schedule, the data, the step loop with its
log line, and periodic checkpoints."""

from __future__ import annotations

import logging
import os
import resource
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from transformers import AutoTokenizer

from bridge import AutoBridge, read_hf_config
from bridge.checkpoint_dirs import RECORD_DIR, SOURCE_FILES_DIR
from bridge.convert import SourceRecord, fresh_record, load_model_weights, record_of_hf_checkpoint
from bridge.tiny import TINY, tiny_tokenizer
from megatron_v4.config import CSA
from megatron_v4.runtime.parallel import destroy, initialize
from megatron_v4.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_v4.training.data import ByteTokenizer, DataOrder, HFTokenizer, VocabTokenizer, build_dataset, tokenise_to_indexed
from megatron_v4.training.freezing import freeze, parameter_counts, read_freeze_file
from megatron_v4.training.metrics import MetricsWriter
from megatron_v4.training.model_setup import (
    bare_model,
    build_model,
    checkpoint_mtp_layers,
    export_record,
    read_architecture,
    transformer_config,
)
from megatron_v4.training.optimizer import build_optimizer, optimizer_config, uses_distributed_adam
from megatron_v4.training.sft import ChatRenderer, SFTDataset, pack, read_conversations, split_conversations
from megatron_v4.training.step import evaluate, prepare_for_training, train_step

log = logging.getLogger("pretrain")


def architecture(args):
    """The architecture (a `bridge.DeepSeekV4HFConfig`) and the checkpoint to load model weights from."""
    if args.hf:
        return read_hf_config(args.hf), None
    if args.load:
        resume = latest_checkpoint(args.load)
        return read_architecture(resume or args.load), resume or args.load
    if args.arch:
        return read_hf_config(args.arch), None
    return TINY, None


PHASES = {
    # DeepSeek-V3.2 report, section 2.1 (the recipe V4's CSA layers follow): dense warm-up of the model,
    # then of the indexer alone by distillation, then sparse training with the sparse distillation loss.
    "dense": dict(csa_dense_attention=True, indexer_use_sparse_loss=False, default_coeff=0.0),
    "indexer-warmup": dict(csa_dense_attention=True, indexer_use_sparse_loss=False, default_coeff=1.0),
    "sparse": dict(csa_dense_attention=False, indexer_use_sparse_loss=True, default_coeff=0.01),
}
INDEXER_PARAMETERS = r".*\.indexer\..*"
"""The lightning indexer's parameters (wq_b, weights_proj and its own compressor): all the indexer warm-up
trains."""


def phase_config(args, arch) -> dict:
    """The config fields of `--phase` and `--indexer-loss-coeff`."""
    phase = dict(PHASES[args.phase])
    default = phase.pop("default_coeff") if CSA in arch.compress_ratios else 0.0
    coeff = default if args.indexer_loss_coeff is None else args.indexer_loss_coeff
    if args.phase == "indexer-warmup":
        phase["moe_router_bias_update_rate"] = 0.0  # the router is frozen with the rest of the model
    return dict(phase, indexer_loss_coeff=coeff)


def phase_frozen(phase: str, config) -> list[str]:
    """Parameter patterns a phase freezes: the unused indexer in the dense phase (so that weight decay
    does not shrink it either), everything but the indexer in its warm-up."""
    if CSA not in config.compress_ratios:
        return []
    return {"dense": [INDEXER_PARAMETERS], "indexer-warmup": [f"(?!{INDEXER_PARAMETERS}).*"]}.get(phase, [])


def model_config(args, arch, layout):
    name = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
    mtp = args.mtp_layers
    if mtp is None and args.load and not latest_checkpoint(args.load):
        mtp = checkpoint_mtp_layers(args.load)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    settings = dict(
        mtp_num_layers=mtp,
        mtp_loss_scaling_factor=args.mtp_loss_scale,
        moe_router_bias_update_rate=args.bias_update_rate,
        moe_token_dispatcher_type=args.moe_dispatcher,
        **(recompute if args.recompute else {}),
    )
    settings.update(phase_config(args, arch))
    return transformer_config(arch, dtype, **settings)


def chat_tokenizer(args):
    """The tokenizer that renders --sft-data: --tokenizer DIR, else the checkpoint's own (--hf, or the files
    an import keeps from its source), else the tiny model's when training the default tiny architecture."""
    if args.tokenizer or args.hf:
        directory = args.tokenizer or args.hf
    elif args.load:
        directory = os.path.join(latest_checkpoint(args.load) or args.load, RECORD_DIR, SOURCE_FILES_DIR)
    elif args.arch:
        raise ValueError("--sft-data with --arch needs a tokenizer with a chat template: --tokenizer DIR")
    else:
        return tiny_tokenizer()
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"no tokenizer in {directory}; give one with --tokenizer DIR")
    return AutoTokenizer.from_pretrained(directory)


def sft_dataset(args, order: DataOrder, vocab_size: int):
    """(train, validation or None) packed chat datasets of --sft-data."""
    tokenizer = chat_tokenizer(args)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}")
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    renderer = ChatRenderer(tokenizer, template)
    train, valid = split_conversations(read_conversations(args.sft_data), args.split)
    filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_rows = pack(train, renderer, args.seq_length, filler)
    if dist.get_rank() == 0:
        tokens = len(train_rows) * args.seq_length
        trained = sum(sum(row.assistant) for row in train_rows)
        log.info("--sft-data: %d conversations in %d rows of %d tokens, %.1f%% of them the assistant's",
                 len(train), len(train_rows), args.seq_length, 100 * trained / tokens)
    valid_rows = pack(valid, renderer, args.seq_length, filler) if args.eval_interval else None
    return SFTDataset(train_rows, args.seed), valid_rows and SFTDataset(valid_rows, args.seed)


def dataset(args, order: DataOrder, vocab_size: int):
    """(train, validation or None) datasets."""
    if args.sft_data:
        return sft_dataset(args, order, vocab_size)
    num_samples = args.train_iters * order.global_batch_size
    valid_samples = args.eval_iters * order.global_batch_size if args.eval_interval else 0
    cache = args.data_cache
    if args.tokenizer:
        tokenizer = HFTokenizer(args.tokenizer)
    elif args.text_file:
        tokenizer = ByteTokenizer()
    else:  # prepared or mock data: only the vocabulary size and an end-of-document id matter
        tokenizer = VocabTokenizer(vocab_size)
    if args.text_file:
        cache = cache or os.path.dirname(os.path.abspath(args.text_file))
        name = os.path.splitext(os.path.basename(args.text_file))[0] + "_tokens"
        prefix = tokenise_to_indexed(args.text_file, tokenizer, os.path.join(cache, name))
        kind = "indexed"
    else:
        prefix, kind = args.data_path, "indexed" if args.data_path else "mock"
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}; "
            "use a model with a larger vocab_size (--arch) or a smaller tokenizer"
        )
    return build_dataset(
        kind, num_samples, args.seq_length, tokenizer, args.seed, prefix, cache, args.split, valid_samples,
        pack_documents=args.pack_documents,
    )


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pretrain(args) -> list[dict]:
    """Train as `examples/pretrain.py` asks (its parsed, checked arguments); returns the metrics of every
    step this run made (the same on every rank)."""
    sp = args.sp or args.tp > 1
    layout = initialize(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp, sp=sp, seed=args.seed)
    try:
        return _train(args, layout)
    finally:
        destroy()


def _train(args, layout) -> list[dict]:
    order = DataOrder(
        micro_batch_size=args.micro_batch_size,
        num_microbatches=args.global_batch_size // (args.micro_batch_size * layout.dp),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=layout.dp,
    )
    arch, weights = architecture(args)
    config = model_config(args, arch, layout)
    if args.optimizer == "dist_muon" and not config.bf16 and args.save:
        raise ValueError(
            "--optimizer dist_muon saves checkpoints only in bf16 (Megatron-Core 0.19's layer-wise optimizer "
            "has no fp32 checkpoint layout); use --dtype bf16 or --optimizer muon"
        )
    bare = build_bare(args, config)
    model, bare = build_model(config, use_distributed_optimizer=uses_distributed_adam(args.optimizer), bare=bare)
    optimizer = build_optimizer(model, optimizer_config(args, config.params_dtype))
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
    prepare_for_training(model, optimizer)

    start = 0
    resume = latest_checkpoint(args.load) if args.load and not args.finetune else None
    if resume:
        common = load_checkpoint(resume, bare, optimizer, scheduler)
        start = common["step"]
        if dist.get_rank() == 0:
            log.info("resumed %s at step %d (%d samples consumed)", resume, start, common["consumed_samples"])
    elif args.load:
        source = latest_checkpoint(args.load) or args.load
        load_model_weights(bare, source)
        optimizer.reload_model_params()
        if dist.get_rank() == 0:
            log.info("model weights from %s%s", source, " (finetune: new optimizer, schedule and step count)"
                     if args.finetune else "")
    elif args.hf:
        AutoBridge.from_hf_pretrained(args.hf).load_hf_weights([bare])
        optimizer.reload_model_params()
        if dist.get_rank() == 0:
            log.info("model weights from %s", args.hf)

    # What `bridge export` needs to write this run's checkpoints back to Hugging Face: the record of the
    # weights it started from (an import's, with its original scales; a HF checkpoint's; or none).
    if weights:
        record, scales_from = export_record(bare, SourceRecord.load(weights)), weights
    else:
        base = record_of_hf_checkpoint(args.hf) if args.hf else fresh_record(arch)
        record, scales_from = export_record(bare, base), None

    train_data, valid_data = dataset(args, order, config.vocab_size)
    stop = args.train_iters if args.exit_after is None else min(args.train_iters, args.exit_after)
    history = []
    writer = MetricsWriter(args.metrics_jsonl, args.tensorboard_dir)
    try:
        model.train()
        for step in range(start, stop):
            began = time.perf_counter()
            metrics = train_step(model, optimizer, scheduler, train_data, order, step, args.seq_length)
            seconds = time.perf_counter() - began
            metrics.update(step=step + 1, seconds=seconds, tokens_per_s=metrics["tokens"] / seconds, mem_gb=memory_gb())
            history.append(metrics)
            writer.step(metrics)
            if dist.get_rank() == 0 and (step + 1) % args.log_interval == 0:
                mtp = "" if metrics["mtp_loss"] is None else f" | mtp loss {metrics['mtp_loss']:.4f}"
                if metrics["indexer_loss"] is not None:
                    mtp += f" | indexer loss {metrics['indexer_loss']:.4f}"
                log.info(
                    "step %d/%d | loss %.4f%s | grad norm %.3f | lr %.2e | %.0f tokens/s | mem %.2f GB",
                    step + 1, args.train_iters, metrics["loss"], mtp, metrics["grad_norm"],
                    metrics["lr"], metrics["tokens_per_s"], metrics["mem_gb"],
                )
            done = step + 1
            if args.eval_interval and (done % args.eval_interval == 0 or done == stop):
                result = evaluate(model, valid_data, order, args.eval_iters, args.seq_length)
                result.update(step=done)
                metrics["eval"] = result
                writer.evaluation(result)
                if dist.get_rank() == 0:
                    mtp = "" if result["eval_mtp_loss"] is None else f" | mtp loss {result['eval_mtp_loss']:.4f}"
                    if result["eval_indexer_loss"] is not None:
                        mtp += f" | indexer loss {result['eval_indexer_loss']:.4f}"
                    log.info("validation at step %d | loss %.4f%s", done, result["eval_loss"], mtp)
            periodic = args.save_interval and done % args.save_interval == 0
            if args.save and (periodic or done == stop):
                path = save_checkpoint(
                    args.save, done, bare, optimizer, scheduler, arch, record,
                    consumed_samples=done * order.global_batch_size, scales_from=scales_from,
                )
                if dist.get_rank() == 0:
                    log.info("saved %s", path)
    finally:
        writer.close()
    return history


def build_bare(args, config):
    """This rank's model before DDP, with the --freeze / --freeze-file tensors frozen (and the parameter
    counts logged): DDP and the optimizer then leave frozen tensors without gradient or state."""
    bare = bare_model(config)
    patterns = (args.freeze or []) + phase_frozen(args.phase, config)
    official = read_freeze_file(args.freeze_file) if args.freeze_file else []
    if patterns or official:
        frozen = freeze(bare, patterns, official)
        if dist.get_rank() == 0:
            log.info("frozen on rank 0: %d tensors", len(frozen))
    counts = parameter_counts(bare)
    if dist.get_rank() == 0:
        log.info(
            "parameters: %d trainable, %d frozen, %d total", counts["trainable"], counts["frozen"], counts["total"]
        )
    return bare

"""Generate text with DeepSeek-V4 in Megatron-Core, at any TP / EP / PP layout, with the decode cache.

    # one process, a tiny random checkpoint made on the fly (CPU-sized default)
    python examples/generate.py --prompt-ids 1,2,3 --max-new-tokens 16 --greedy

    # a Hugging Face checkpoint, 2-way tensor x 2-way expert parallel, sampled
    torchrun --nproc-per-node 4 examples/generate.py --hf /data/DeepSeek-V4-Flash --tp 2 --ep 2 \\
        --prompt "Why is the sky blue?" --temperature 0.7 --top-p 0.95 --seed 1

    # a checkpoint converted with `python -m bridge import`, 2 pipeline stages
    torchrun --nproc-per-node 2 examples/generate.py --mcore /data/dsv4-mcore --pp 2 --prompt-ids 5,6,7

    # a long prompt's prefill split over 4 context-parallel ranks: its logits and the first new token
    torchrun --nproc-per-node 4 examples/generate.py --hf /data/DeepSeek-V4-Flash --cp 4 \
        --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 1 --save-logits prefill.pt

Input: `--prompt TEXT` (tokenised with the checkpoint's Hugging Face tokenizer, or
`--tokenizer DIR`; its chat template wraps the text as a user turn when it has
one, unless `--raw-prompt`) or `--prompt-ids 1,2,3`. `--greedy` picks the most
likely token; otherwise tokens are sampled (`--temperature`, `--top-k`,
`--top-p`, `--seed`). Generation stops after `--max-new-tokens` or at the
checkpoint's end-of-sequence token (`--ignore-eos` to go on). `--no-cache`
re-runs the whole sequence for every token (for comparison). `--json FILE`
writes {"tokens": [new ids], "text": ...}; `--save-logits FILE` saves the
prefill logits (float32 [prompt, vocab], full vocabulary, every position) with
torch.save. Prints the new tokens, the text and the prefill / decode speed. `--cp N` splits
the prompt over N context-parallel ranks (its length divisible by N) for the prefill only: the decode
state holds the whole sequence, so with `--cp` the run stops after the first new token
(`--max-new-tokens 1`); decode several tokens without `--cp`.
Without `--hf` / `--mcore`, a tiny random checkpoint is written to `--tiny-dir`.
"""

from __future__ import annotations

import os
import sys

from bridge.checkpoint_dirs import CONFIG_FILE, RECORD_DIR, resolve_checkpoint
from megatron_v4.runtime.command_line import (
    ArgumentParser,
    UsageError,
    check_world_size,
    existing_directory,
    read_json,
    run_main,
)

DEFAULT_TINY_DIR = "/tmp/dsv4-tiny-generate"


def parse_args(argv):
    parser = ArgumentParser(prog="generate.py", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf", help="Hugging Face checkpoint directory (any of the three namings)")
    source.add_argument("--mcore", help="Megatron-Core checkpoint: a `python -m bridge import` output or a "
                        "pretrain.py --save directory (its latest iteration, or --iteration N)")
    parser.add_argument("--iteration", type=int, help="with --mcore SAVE_DIR: the iteration to load")
    parser.add_argument("--tiny-dir", default=DEFAULT_TINY_DIR,
                        help="without --hf/--mcore: where the tiny random checkpoint is (made if missing)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--cp", type=int, default=1,
                        help="context-parallel size of the prefill (the prompt split into cp contiguous chunks)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint directory)")
    parser.add_argument("--raw-prompt", action="store_true", help="do not apply the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--no-cache", action="store_true", help="re-run the full sequence for every new token")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--json", help="write {\"tokens\": [...], \"text\": ...} to this file")
    parser.add_argument("--save-logits", help="torch.save the prefill logits [prompt, vocab] (float32) here")
    args = parser.parse_args(argv)
    if args.prompt is None and args.prompt_ids is None:
        args.prompt_ids = "1,2,3"
    return check_args(args)


def check_args(args):
    """Mistakes a user makes, answered before PyTorch and Megatron-Core are imported."""
    check_world_size("examples/generate.py", tp=args.tp, pp=args.pp, cp=args.cp)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.cp > 1 and args.max_new_tokens > 1:
        raise UsageError(
            f"--cp {args.cp} splits the prompt's prefill only (the decode state holds the whole sequence): "
            "use --max-new-tokens 1 for the prefill logits and first token, or drop --cp to decode"
        )
    config_dir = None
    if args.hf:
        config_dir = existing_directory(args.hf, "--hf")
    elif args.mcore:
        try:
            args.mcore = resolve_checkpoint(args.mcore, args.iteration)
        except (OSError, ValueError) as e:
            raise UsageError(f"--mcore: {e}") from e
        config_dir = os.path.join(args.mcore, RECORD_DIR)
    elif args.iteration is not None:
        raise UsageError("--iteration chooses a checkpoint of --mcore DIR; give --mcore")
    if args.tokenizer:
        existing_directory(args.tokenizer, "--tokenizer", expect=None)
    if args.prompt_ids is not None:
        try:
            args.prompt_token_ids = [int(token) for token in args.prompt_ids.split(",") if token.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers, e.g. 1,2,3")
        if not args.prompt_token_ids:
            raise UsageError("--prompt-ids is empty; give comma-separated integers, e.g. 1,2,3")
        if len(args.prompt_token_ids) % args.cp:
            raise UsageError(
                f"--cp {args.cp} splits the prompt into equal chunks: {len(args.prompt_token_ids)} prompt "
                f"tokens are not divisible by {args.cp}; give a multiple of {args.cp} tokens"
            )
        if config_dir:
            config = read_json(os.path.join(config_dir, CONFIG_FILE), CONFIG_FILE)
            vocab = config.get("vocab_size")
            bad = [t for t in args.prompt_token_ids if vocab and not 0 <= t < vocab]
            if bad:
                raise UsageError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")
            longest = config.get("max_position_embeddings")
            if longest and len(args.prompt_token_ids) + args.max_new_tokens > longest:
                raise UsageError(
                    f"{len(args.prompt_token_ids)} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed "
                    f"max_position_embeddings {longest}; shorten the prompt or generate fewer tokens"
                )
    return args


def main(argv=None) -> dict:
    """Run the command line; returns {"tokens", "text", "prefill_seconds", "decode_tokens_per_second"}."""
    args = parse_args(argv)
    # After the argument checks: importing PyTorch, Megatron-Core and transformers takes seconds.
    from megatron_v4.inference.launch import run_generation

    return run_generation(args)


if __name__ == "__main__":
    run_main("generate.py", lambda: main(sys.argv[1:]))

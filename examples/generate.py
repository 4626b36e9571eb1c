"""Generate text with DeepSeek-V4 in Megatron-Core, at any TP / EP / PP layout, with the decode cache.

    # one process, a tiny random checkpoint made on the fly (CPU-sized default)
    python examples/generate.py --prompt-ids 1,2,3 --max-new-tokens 16 --greedy

    # a Hugging Face checkpoint, 2-way tensor x 2-way expert parallel, sampled
    torchrun --nproc-per-node 4 examples/generate.py --hf /data/DeepSeek-V4-Flash --tp 2 --ep 2 \\
        --prompt "Why is the sky blue?" --temperature 0.7 --top-p 0.95 --seed 1

    # a checkpoint converted with `python -m bridge import`, 2 pipeline stages
    torchrun --nproc-per-node 2 examples/generate.py --mcore /data/dsv4-mcore --pp 2 --prompt-ids 5,6,7

Input: `--prompt TEXT` (tokenised with the checkpoint's Hugging Face tokenizer, or
`--tokenizer DIR`; its chat template wraps the text as a user turn when it has
one, unless `--raw-prompt`) or `--prompt-ids 1,2,3`. `--greedy` picks the most
likely token; otherwise tokens are sampled (`--temperature`, `--top-k`,
`--top-p`, `--seed`). Generation stops after `--max-new-tokens` or at the
checkpoint's end-of-sequence token (`--ignore-eos` to go on). `--no-cache`
re-runs the whole sequence for every token (for comparison). `--json FILE`
writes {"tokens": [new ids], "text": ...}; `--save-logits FILE` saves the
prefill logits (float32 [prompt, vocab], full vocabulary, every position) with
torch.save. Prints the new tokens, the text and the prefill / decode speed.
Without `--hf` / `--mcore`, a tiny random checkpoint is written to `--tiny-dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist

import megatron_v4
from megatron_v4.inference import SamplingParams, generate

DEFAULT_TINY_DIR = "/tmp/dsv4-tiny-generate"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hf", help="Hugging Face checkpoint directory (any of the three namings)")
    source.add_argument("--mcore", help="Megatron-Core checkpoint written by `python -m bridge import`")
    parser.add_argument("--tiny-dir", default=DEFAULT_TINY_DIR,
                        help="without --hf/--mcore: where the tiny random checkpoint is (made if missing)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
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
    return args


def _is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _checkpoint_dirs(args) -> tuple[str, str]:
    """(directory of the weights, directory of the Hugging Face config / tokenizer)."""
    if args.hf:
        return args.hf, args.hf
    if args.mcore:
        from bridge.convert import RECORD_DIR

        return args.mcore, os.path.join(args.mcore, RECORD_DIR)
    if _is_first_rank() and not os.path.exists(os.path.join(args.tiny_dir, "config.json")):
        from bridge import make_tiny_checkpoint

        make_tiny_checkpoint(args.tiny_dir, naming="official", with_mtp=False)
    dist.barrier()
    return args.tiny_dir, args.tiny_dir


def _load_model(args, weights_dir: str, dtype: torch.dtype):
    # One new token cannot be split over the TP ranks: decode runs without sequence parallelism.
    if args.mcore:
        from bridge.convert import load_megatron_model

        return load_megatron_model(weights_dir, dtype=dtype, sequence_parallel=False).eval()
    from bridge import AutoBridge

    return AutoBridge.from_hf_pretrained(weights_dir).to_megatron_model(dtype=dtype, sequence_parallel=False)[0].eval()


def _tokenizer(path: str | None):
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(token) for token in args.prompt_ids.split(",") if token.strip()]
        except ValueError:
            raise SystemExit(f"--prompt-ids {args.prompt_ids!r}: give comma-separated integers, e.g. 1,2,3")
    if tokenizer is None:
        raise SystemExit("--prompt needs a tokenizer: the checkpoint has none; pass --tokenizer DIR or --prompt-ids")
    if getattr(tokenizer, "chat_template", None) and not args.raw_prompt:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return tokenizer(args.prompt)["input_ids"]


def _eos_token_id(config_dir: str, tokenizer) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    try:
        with open(os.path.join(config_dir, "config.json")) as f:
            eos = json.load(f).get("eos_token_id")
    except OSError:
        return None
    return eos[0] if isinstance(eos, list) else eos


def main(argv=None) -> dict:
    """Run the command line; returns {"tokens", "text", "prefill_seconds", "decode_tokens_per_second"}."""
    args = parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    megatron_v4.initialize(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, seed=args.seed)
    try:
        weights_dir, config_dir = _checkpoint_dirs(args)
        tokenizer = _tokenizer(args.tokenizer or config_dir)
        prompt = _prompt_ids(args, tokenizer)
        model = _load_model(args, weights_dir, dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        sampling = SamplingParams(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
        result = generate(
            model,
            torch.tensor([prompt], dtype=torch.long, device=device),
            args.max_new_tokens,
            sampling,
            use_cache=not args.no_cache,
            keep_prefill_logits=args.save_logits is not None,
            eos_token_id=None if args.ignore_eos else _eos_token_id(config_dir, tokenizer),
        )
        tokens = result.tokens[0].tolist()
        text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
        summary = {
            "tokens": tokens,
            "text": text,
            "prefill_seconds": result.prefill_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second,
        }
        if _is_first_rank():
            mode = "full re-run per token" if args.no_cache else "decode cache"
            print(f"prompt: {len(prompt)} tokens; new tokens ({len(tokens)}): {tokens}")
            if text is not None:
                print(f"text: {text}")
            print(f"prefill {result.prefill_seconds:.3f} s ({len(prompt) / result.prefill_seconds:.1f} tokens/s); "
                  f"decode ({mode}) {result.decode_tokens_per_second:.2f} tokens/s over {result.decode_steps} steps")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"tokens": tokens, "text": text}, f)
            if args.save_logits:
                torch.save(result.prefill_logits[0].cpu(), args.save_logits)
        return summary
    finally:
        megatron_v4.destroy()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("bridge").setLevel(logging.WARNING)
    main(sys.argv[1:])

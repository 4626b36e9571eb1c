"""Generation as `examples/generate.py` runs it: the checkpoint (Hugging Face through the bridge, a
Megatron-Core import, or a tiny random one), the tokenizer and its chat template, sampling, and the
printed summary."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from bridge import AutoBridge, make_tiny_checkpoint
from bridge.checkpoint_dirs import RECORD_DIR
from bridge.convert import load_megatron_model
from megatron_v4.inference.generation import SamplingParams, generate, prefill
from megatron_v4.runtime.command_line import UsageError
from megatron_v4.runtime.parallel import destroy, initialize


def _is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _checkpoint_dirs(args) -> tuple[str, str]:
    """(directory of the weights, directory of the Hugging Face config / tokenizer)."""
    if args.hf:
        return args.hf, args.hf
    if args.mcore:
        return args.mcore, os.path.join(args.mcore, RECORD_DIR)
    if _is_first_rank() and not os.path.exists(os.path.join(args.tiny_dir, "config.json")):
        make_tiny_checkpoint(args.tiny_dir, naming="official", with_mtp=False)
    dist.barrier()
    return args.tiny_dir, args.tiny_dir


def _load_model(args, weights_dir: str, dtype: torch.dtype):
    # One new token cannot be split over the TP ranks: decode runs without sequence parallelism.
    if args.mcore:
        return load_megatron_model(weights_dir, dtype=dtype, sequence_parallel=False).eval()
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
        return args.prompt_token_ids
    if tokenizer is None:
        raise UsageError("--prompt needs a tokenizer: the checkpoint has none; pass --tokenizer DIR or --prompt-ids")
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


def run_generation(args) -> dict:
    """Generate as `examples/generate.py` asks (its parsed, checked arguments); returns {"tokens", "text",
    "prefill_seconds", "decode_tokens_per_second"}."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    initialize(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=args.etp, seed=args.seed)
    try:
        weights_dir, config_dir = _checkpoint_dirs(args)
        tokenizer = _tokenizer(args.tokenizer or config_dir)
        prompt = _prompt_ids(args, tokenizer)
        model = _load_model(args, weights_dir, dtype)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        sampling = SamplingParams(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
        )
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=device)
        if args.cp > 1:  # the prefill only (check_args allows one new token)
            result = prefill(model, prompt_ids, sampling)
        else:
            result = generate(
                model,
                prompt_ids,
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
            speed = f"prefill {result.prefill_seconds:.3f} s ({len(prompt) / result.prefill_seconds:.1f} tokens/s)"
            if args.cp > 1:
                speed += f" over {args.cp} context-parallel ranks"
            else:
                speed += (f"; decode ({mode}) {result.decode_tokens_per_second:.2f} tokens/s over "
                          f"{result.decode_steps} steps")
            print(speed)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"tokens": tokens, "text": text}, f)
            if args.save_logits:
                torch.save(result.prefill_logits[0].cpu(), args.save_logits)
        return summary
    finally:
        destroy()

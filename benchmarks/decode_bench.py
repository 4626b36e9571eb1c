"""Decode speed with and without the decode cache at a long prompt (CPU-sized model).

    python benchmarks/decode_bench.py                      # 2048-token prompt, tiny dims, 1 thread
    python benchmarks/decode_bench.py --prompt-len 4096 --threads 2

The model is bridge.tiny's random architecture (hidden 64, 4 layers with ratios
0 / 4 / 128 / 4, window 8, 16 indexer heads) in float32, one rank. Both runs
start from the same prefill; "cached" decodes each token against the decode
state, "re-run" runs the whole sequence for every token (what decoding costs
without a cache). Prints prefill time, decode tokens/s of both and the speed-up,
and checks that both produced the same greedy tokens.
"""

from __future__ import annotations

import argparse
import logging
import warnings

import torch
import transformers

import megatron_v4
from bridge import AutoBridge
from bridge.tiny import make_tiny_model, tiny_config
from megatron_v4.inference import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded with the cache")
    parser.add_argument("--rerun-tokens", type=int, default=8, help="tokens decoded by re-running the sequence")
    parser.add_argument("--index-topk", type=int, default=64, help="compressed entries a CSA query reads")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    length = args.prompt_len + max(args.new_tokens, args.rerun_tokens)
    cfg = tiny_config(max_position_embeddings=length, index_topk=args.index_topk)
    reference = make_tiny_model(cfg, seed=0)
    megatron_v4.initialize()
    try:
        model = AutoBridge.from_hf_pretrained(reference).to_megatron_model(dtype=torch.float32)[0].eval()
        del reference
        device = next(model.parameters()).device
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)
        generate(model, prompt[:, :64], 4)  # warm-up
        cached = generate(model, prompt, args.new_tokens, use_cache=True)
        rerun = generate(model, prompt, args.rerun_tokens, use_cache=False)
    finally:
        megatron_v4.destroy()

    same = min(args.new_tokens, args.rerun_tokens)
    agree = torch.equal(cached.tokens[:, :same], rerun.tokens[:, :same])
    print(f"model: hidden {cfg.hidden_size}, layers {cfg.num_layers} (ratios {list(cfg.compress_ratios)}), "
          f"window {cfg.sliding_window}, index_topk {cfg.index_topk}; float32 on {device}, "
          f"{args.threads} CPU thread(s)")
    print(f"prompt {args.prompt_len} tokens: prefill {cached.prefill_seconds:.2f} s")
    print(f"decode with cache:    {cached.decode_tokens_per_second:8.2f} tokens/s "
          f"({1e3 / cached.decode_tokens_per_second:.1f} ms/token over {cached.decode_steps} tokens)")
    print(f"decode re-running:    {rerun.decode_tokens_per_second:8.2f} tokens/s "
          f"({1e3 / rerun.decode_tokens_per_second:.1f} ms/token over {rerun.decode_steps} tokens)")
    print(f"speed-up: {cached.decode_tokens_per_second / rerun.decode_tokens_per_second:.1f}x; "
          f"greedy tokens agree on the first {same}: {agree}")
    if not agree:
        raise SystemExit("the cached and re-run decodes disagree")


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.getLogger("bridge").setLevel(logging.WARNING)
    main()

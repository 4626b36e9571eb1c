"""Forward+backward time and peak memory of one attention layer per type, from 2K to 32K tokens.

    python benchmarks/long_context_bench.py                          # 2K..32K, 2 threads
    python benchmarks/long_context_bench.py --lengths 2048 4096 --threads 1
    python benchmarks/long_context_bench.py --lengths 2048 4096 8192 --cp 2   # adds a CP=2 column

CPU-sized dims (hidden 64, 4 heads of width 64, window 128, CSA top-k 256 of ratio-4 entries, HCA
ratio 128), float32, batch 1, one rank. For each layer type (sliding, CSA, HCA) and length: our
DeepSeekV4HybridSelfAttention next to transformers' DeepseekV4Attention (eager, with the
[s, s] sliding-window mask DeepseekV4Model builds; run only where its estimated memory fits under
--reference-limit-gb). Time: one forward + backward of sum(output), after a warm-up. Peak memory: the
process's peak resident memory during that step above what it held before (Linux VmHWM, reset
through /proc/self/clear_refs). Growth: the ratio to the previous length (linear in s = 2.0 per
doubling). Every column is one `Variant`.

`--cp N` adds our layer at context parallelism N: N gloo ranks (`run_on_ranks`), each with
threads / N threads, each holding a contiguous 1/N of the sequence; the column shows the slowest
rank's time and the largest per-rank peak (each rank computes its chunk's key side plus a halo and
all-gathers the compressed entries, `megatron_v4.attention`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import build_module
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

import megatron_v4
from megatron_v4.config import DeepSeekV4TransformerConfig
from megatron_v4.context_parallel import local_chunk
from megatron_v4.runtime.memory import status_kib
from megatron_v4.runtime.ranks import run_on_ranks
from megatron_v4.specs import get_dsv4_attention_spec

HIDDEN, HEADS, HEAD_DIM, ROPE_DIM, Q_LORA, O_GROUPS, O_LORA = 64, 4, 64, 16, 64, 2, 32
WINDOW, INDEX_HEADS, INDEX_HEAD_DIM, INDEX_TOPK = 128, 4, 32, 256
LAYER_TYPES = {"sliding": 0, "CSA": 4, "HCA": 128}
TRANSFORMERS_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


def resident_kib(field: str) -> int:
    kib = status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} not in /proc/self/status: this benchmark needs Linux")
    return kib


def measure(step: Callable[[], None]) -> tuple[float, float]:
    """(seconds, peak MiB above the resident memory before) of one call of `step`."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the baseline is what is live
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return seconds, (resident_kib("VmHWM") - before) / 1024


def ours(ratio: int, layout) -> Callable[[int], Callable[[], None]]:
    config = DeepSeekV4TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        kv_channels=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        q_lora_rank=Q_LORA,
        o_groups=O_GROUPS,
        o_lora_rank=O_LORA,
        sliding_window=WINDOW,
        compress_ratios=[ratio],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        num_hash_layers=0,
        use_cpu_initialization=True,
        **layout.config_kwargs(),
    )
    layer = build_module(get_dsv4_attention_spec(use_te=False), config=config, layer_number=1)
    cp_group = layer.cp_group

    def prepare(length: int) -> Callable[[], None]:
        # Under context parallelism: this rank's contiguous chunk of the sequence.
        hidden = local_chunk(torch.randn(length, 1, HIDDEN), 0, cp_group).requires_grad_()

        def step():
            layer(hidden)[0].sum().backward()

        return step

    return prepare


def reference(ratio: int) -> Callable[[int], Callable[[], None]]:
    config = DeepseekV4Config(
        vocab_size=32,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        qk_rope_head_dim=ROPE_DIM,
        q_lora_rank=Q_LORA,
        o_groups=O_GROUPS,
        o_lora_rank=O_LORA,
        sliding_window=WINDOW,
        layer_types=[TRANSFORMERS_TYPE[ratio]],
        index_n_heads=INDEX_HEADS,
        index_head_dim=INDEX_HEAD_DIM,
        index_topk=INDEX_TOPK,
        num_hash_layers=0,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        max_position_embeddings=1 << 16,
    )
    config._attn_implementation = "eager"
    layer, rotary = DeepseekV4Attention(config, layer_idx=0), DeepseekV4RotaryEmbedding(config)

    def prepare(length: int) -> Callable[[], None]:
        hidden = torch.randn(1, length, HIDDEN, requires_grad=True)
        position_ids = torch.arange(length).unsqueeze(0)
        distance = position_ids.view(-1, 1) - position_ids.view(1, -1)
        mask = torch.zeros(length, length).masked_fill((distance < 0) | (distance >= WINDOW), float("-inf"))
        mask = mask.view(1, 1, length, length)

        def step():
            embeddings = {
                kind: rotary(hidden, position_ids=position_ids, layer_type=kind) for kind in ("main", "compress")
            }
            layer(hidden, embeddings, position_ids, mask)[0].sum().backward()

        return step

    return prepare


def reference_gib(ratio: int, length: int) -> float:
    """transformers' eager attention holds [H, s, s + entries] scores and probabilities, and the mask."""
    entries = 0 if ratio == 0 else length // ratio
    return 4 * (3 * HEADS * length * (length + entries) + length * length) / 2**30


def measure_lengths(prepare: Callable[[int], Callable[[], None]], lengths: list[int], fits) -> list:
    """[(seconds, MiB) or None where it does not fit] of one warmed-up step per length."""
    results = []
    for length in lengths:
        if not fits(length):
            results.append(None)
            continue
        prepare(min(length, 512))()  # warm-up
        results.append(measure(prepare(length)))
    return results


def context_parallel_rank(ratio: int, lengths: list[int], cp: int, threads: int) -> list:
    """One rank of `--cp`: our layer on its chunk of every length."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layout = megatron_v4.initialize(cp=cp)
    try:
        return measure_lengths(ours(ratio, layout), lengths, lambda length: True)
    finally:
        megatron_v4.destroy()


def context_parallel(ratio: int, lengths: list[int], cp: int, threads: int) -> list:
    """Per length: (the slowest rank's seconds, the largest rank's peak MiB)."""
    per_rank = run_on_ranks(context_parallel_rank, cp, ratio, lengths, cp, max(threads // cp, 1), timeout=3600)
    return [(max(r[i][0] for r in per_rank), max(r[i][1] for r in per_rank)) for i in range(len(lengths))]


@dataclass
class Variant:
    name: str
    run: Callable[[int, list[int]], list]  # (ratio, lengths) -> [(seconds, MiB) or None] per length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-limit-gb", type=float, default=3.0)
    parser.add_argument("--cp", type=int, default=1, help="also run our layer at this context-parallel size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layout = megatron_v4.initialize()
    variants = [
        Variant("ours", lambda ratio, lengths: measure_lengths(ours(ratio, layout), lengths, lambda length: True)),
        Variant(
            "transformers",
            lambda ratio, lengths: measure_lengths(
                reference(ratio), lengths, lambda length: reference_gib(ratio, length) <= args.reference_limit_gb
            ),
        ),
    ]
    if args.cp > 1:
        variants.append(
            Variant(f"ours cp={args.cp}", lambda ratio, lengths: context_parallel(ratio, lengths, args.cp, args.threads))
        )
    header = f"{'layer':8} {'tokens':>7}" + "".join(
        f" | {v.name + ' s':>15} {'x':>5} {v.name + ' MiB':>17} {'x':>5}" for v in variants
    )
    print(header)
    print("-" * len(header))
    for type_name, ratio in LAYER_TYPES.items():
        columns = [variant.run(ratio, args.lengths) for variant in variants]
        for row_index, length in enumerate(args.lengths):
            row = f"{type_name:8} {length:>7}"
            for column in columns:
                measured, previous = column[row_index], column[row_index - 1] if row_index else None
                if measured is None:
                    row += f" | {'(does not fit)':>15} {'':>5} {'':>17} {'':>5}"
                    continue
                seconds, mib = measured
                growth = ("", "") if previous is None else (
                    f"{seconds / previous[0]:.1f}", f"{mib / max(previous[1], 1e-9):.1f}"
                )
                row += f" | {seconds:>15.2f} {growth[0]:>5} {mib:>17.0f} {growth[1]:>5}"
            print(row, flush=True)
    megatron_v4.destroy()


if __name__ == "__main__":
    main()

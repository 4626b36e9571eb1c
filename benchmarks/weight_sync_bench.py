"""Weight-sync speed: the in-memory routes of an RL trainer, each next to a copy of the same bytes.

    python benchmarks/weight_sync_bench.py [--hidden 1024] [--experts 16] [--bucket-mb 64] [--repeats 3]

A random bf16 DeepSeek-V4 checkpoint (official naming, 4 layers, bf16 model) is
moved through each route, at one rank and at TP2xEP2 (four gloo ranks on this
machine's CPUs):

- `to_megatron_model`: build the model and load the checkpoint directory into it;
  its limit is reading the same files into memory (page cache warm);
- export: `export_hf_weights(bucket_bytes=...)`, every tensor copied into a
  preallocated receive buffer of its shape (what an inference engine does with it);
  at TP2xEP2 with `ranks="all"` (every rank receives everything) and `ranks="owner"`;
- load: `load_hf_weights(model, tensors)` from an in-memory dict of the full tensors
  (each rank copies in its share).

The limit of the in-memory routes is `dst.copy_(src)` of the same number of bytes in
one process. GB/s are model bytes over the slowest rank's time; the best of
`--repeats` runs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch

from megatron_v4.runtime.command_line import ArgumentParser, run_main

GB = 1e9


def _config(hidden: int, experts: int):
    from bridge.tiny import tiny_config

    return tiny_config(
        vocab_size=32768,
        hidden_size=hidden,
        num_attention_heads=8,
        head_dim=128,
        qk_rope_head_dim=64,
        q_lora_rank=hidden // 2,
        o_groups=4,
        o_lora_rank=hidden // 4,
        index_n_heads=8,
        index_head_dim=64,
        num_routed_experts=experts,
        moe_intermediate_size=hidden // 2,
        dtype="bfloat16",
        max_position_embeddings=4096,
    )


def _best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _file_read_seconds(checkpoint: str, repeats: int) -> float:
    files = [os.path.join(checkpoint, f) for f in os.listdir(checkpoint) if f.endswith(".safetensors")]
    buffer = bytearray(max(os.path.getsize(f) for f in files))

    def read():
        for file in files:
            with open(file, "rb", buffering=0) as f:
                f.readinto(buffer)

    return _best(read, repeats)


def _memcpy_seconds(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # the pages exist before timing, as the routes' receive buffers and models do
    return _best(lambda: dst.copy_(src), repeats)


def measure(checkpoint: str, layout: dict, bucket_bytes: int, repeats: int) -> dict:
    """Seconds of each route on this rank (run on every rank of the layout)."""
    import torch.distributed as dist

    import megatron_v4
    from bridge import AutoBridge
    from bridge.safetensors_io import SafetensorsCheckpoint

    megatron_v4.initialize(**layout)
    try:
        bridge = AutoBridge.from_hf_pretrained(checkpoint)
        seconds = {}

        def timed(label, run):
            def synchronised():
                dist.barrier()
                run()
                dist.barrier()

            seconds[label] = _best(synchronised, repeats)

        chunks = []
        timed("to_megatron_model", lambda: chunks.__setitem__(slice(None), bridge.to_megatron_model()))
        full = dict(SafetensorsCheckpoint(checkpoint).items())
        received = {name: torch.empty_like(tensor) for name, tensor in full.items()}

        def export(ranks):
            for bucket in bridge.export_hf_weights(chunks, bucket_bytes=bucket_bytes, ranks=ranks):
                for name, tensor in bucket:
                    received[name].copy_(tensor)

        timed("export (all)", lambda: export("all"))
        if dist.get_world_size() > 1:
            timed("export (owner)", lambda: export("owner"))
        timed("load_hf_weights", lambda: bridge.load_hf_weights(chunks, full))
        return seconds
    finally:
        megatron_v4.destroy()


def main() -> int:
    from bridge.tiny import make_tiny_checkpoint
    from megatron_v4.runtime.ranks import run_on_ranks

    parser = ArgumentParser(prog="weight_sync_bench.py", description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024: ~0.37 GB)")
    parser.add_argument("--experts", type=int, default=16, help="routed experts (default 16)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="export bucket size in MB (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each route; the best counts (default 3)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="weight-sync-bench-")
    try:
        checkpoint = make_tiny_checkpoint(
            os.path.join(work, "hf"), cfg=_config(args.hidden, args.experts), dtype=torch.bfloat16, with_mtp=False
        )
        nbytes = sum(os.path.getsize(os.path.join(checkpoint, f)) for f in os.listdir(checkpoint))
        memcpy = _memcpy_seconds(nbytes, args.repeats)
        file_read = _file_read_seconds(checkpoint, args.repeats)
        bucket_bytes = args.bucket_mb << 20
        rows = []
        for label, world, layout in (("1 rank", 1, {}), ("TP2xEP2", 4, {"tp": 2, "ep": 2})):
            per_rank = run_on_ranks(measure, world, checkpoint, layout, bucket_bytes, args.repeats, timeout=1800)
            for route in per_rank[0]:
                seconds = max(rank[route] for rank in per_rank)
                limit, limit_label = (file_read, "file read") if route == "to_megatron_model" else (memcpy, "memcpy")
                rows.append((route, label, seconds, limit, limit_label))
        print(
            f"{nbytes / GB:.2f} GB bf16 checkpoint; buckets of {args.bucket_mb} MB; best of {args.repeats}; "
            f"{os.cpu_count()} CPUs"
        )
        print("| route | layout | time | GB/s | limit (same bytes) | limit GB/s | ratio to limit |")
        print("|---|---|---|---|---|---|---|")
        for route, label, seconds, limit, limit_label in rows:
            print(
                f"| {route} | {label} | {seconds:.3f} s | {nbytes / GB / seconds:.2f} | {limit_label} | "
                f"{nbytes / GB / limit:.2f} | {limit / seconds:.2f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_main("weight_sync_bench.py", lambda: sys.exit(main()))

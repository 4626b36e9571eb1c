"""Conversion speed and memory: import and export of a synthetic DeepSeek-V4 checkpoint of a given size.

    python benchmarks/convert_bench.py --size-gb 4 [--source fp8-fp4|bf16] [--workers N] [--workdir DIR] [--keep]

The checkpoint has V4-Flash's tensor shapes and storage formats (hidden 4096, 64
heads of 512, vocabulary 129280, FP8 e4m3 attention and shared experts with
128x128 E8M0 block scales, FP4 routed experts with E8M0 scales per 32, bf16 and
fp32 tensors elsewhere, int64 tid2eid; with `--source bf16` every quantised tensor
is bf16 instead) and as many routed experts as the size asks for (2 layers: one
sliding, one CSA; the first hash-routed). Its bytes are random but valid (no NaN
codes). Import (bf16) and export (back to the source formats) each run in their
own process, which reports its peak RSS and its library start-up apart; the export
is checked byte for byte against the source. `cp -r` of the source directory
(then `sync`) on the same disk is the yardstick: each conversion's speed is printed
as a fraction of cp's (source bytes per second over cp's). Where it may (root on Linux),
the benchmark syncs and drops the page cache right before each of the three timed steps
(in the conversions' processes after their start-up), so that cp, import and export all
read from the disk and start alike;
otherwise it says so, and the source may be read from memory (cp's `copy_file_range`
gains most from that).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from bridge.workers import default_workers
from megatron_v4.runtime.command_line import ArgumentParser, UsageError, run_main
from megatron_v4.runtime.memory import peak_resident_bytes

GB = 1e9
SOURCES = ("fp8-fp4", "bf16")
MIN_EXPERTS = 8
FLASH = dict(
    vocab_size=129280, hidden_size=4096, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64,
    q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, index_n_heads=64, index_head_dim=128,
    index_topk=512, moe_intermediate_size=2048, num_experts_per_tok=6, num_shared_experts=1, num_hash_layers=1,
    num_nextn_predict_layers=0, compress_ratios=(0, 4),
)


def _flash_config(num_experts: int, quantised: bool = True):
    from bridge.tiny import tiny_config

    quant = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    return tiny_config(**FLASH, num_layers=2, num_routed_experts=num_experts, dtype="bfloat16",
                       quantization_config=quant if quantised else None, expert_dtype="fp4" if quantised else None,
                       max_position_embeddings=4096)


def _official_shapes(cfg) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Official tensor names and logical shapes of `cfg`, from transformers' model built on the meta device."""
    from transformers import DeepseekV4ForCausalLM

    from bridge.hf_config import transformers_config
    from bridge.hf_naming import TRANSFORMERS_MODULE, TRANSLATORS

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(transformers_config(cfg))
    official = TRANSLATORS[TRANSFORMERS_MODULE].to_official(model.state_dict().items())
    return {name: (t.shape, t.dtype) for name, t in official}


def _random_stored(name: str, shape, dtype, num_experts: int, g: torch.Generator, quantised: bool = True):
    """[(name, tensor)] as stored in the release: FP8/FP4 codes with E8M0 scales (unless not `quantised`),
    or bf16/fp32/int64."""
    import re

    from bridge.quantisation import FP4_WEIGHTS, FP8_WEIGHTS, FP32_TENSORS

    def e8m0(*s):
        return torch.randint(118, 126, s, generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)

    scale = name.removesuffix(".weight") + ".scale"
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (0, 0)
    if quantised and re.search(FP4_WEIGHTS, name):
        packed = torch.randint(-128, 128, (rows, cols // 2), generator=g, dtype=torch.int8)
        return [(name, packed), (scale, e8m0(rows, cols // 32))]
    if quantised and re.search(FP8_WEIGHTS, name):
        codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
        return [(name, codes.view(torch.float8_e4m3fn)), (scale, e8m0(-(-rows // 128), -(-cols // 128)))]
    if not dtype.is_floating_point:
        return [(name, torch.randint(0, num_experts, tuple(shape), generator=g, dtype=torch.int64))]
    kept = torch.float32 if re.search(FP32_TENSORS, name) else torch.bfloat16
    return [(name, torch.randn(tuple(shape), generator=g).to(kept))]



def make_synthetic_checkpoint(out_dir: str, size_gb: float, seed: int = 0, quantised: bool = True) -> dict:
    """Write the synthetic checkpoint (4 GB shards, like the release); returns its description."""
    from bridge.hf_config import write_official_config
    from bridge.safetensors_io import write_safetensors

    fixed = _official_shapes(_flash_config(1, quantised))
    expert_element = 0.5 + 1 / 32 if quantised else 2  # FP4 with a scale per 32, or bf16
    per_expert = 3 * FLASH["moe_intermediate_size"] * FLASH["hidden_size"] * expert_element * 2  # 2 layers
    fixed_bytes = sum(_numel(s) * (expert_element if "experts.0." in n and ".shared" not in n else 2)
                      for n, (s, _) in fixed.items())
    smallest = (fixed_bytes + MIN_EXPERTS * per_expert) / GB
    if size_gb < smallest:
        raise UsageError(f"--size-gb {size_gb}: the smallest checkpoint with V4-Flash shapes ({MIN_EXPERTS} experts) "
                         f"is {smallest:.2f} GB; use --size-gb {smallest:.2f} or more")
    num_experts = int((size_gb * GB - fixed_bytes) / per_expert)
    cfg = _flash_config(num_experts, quantised)
    g = torch.Generator().manual_seed(seed)

    def tensors():
        for name, (shape, dtype) in _official_shapes(cfg).items():
            yield from _random_stored(name, shape, dtype, num_experts, g, quantised)

    files = write_safetensors(tensors(), out_dir, max_shard_bytes=int(4 * GB))
    write_official_config(cfg, out_dir)
    return {"experts": num_experts, "files": len(files), "bytes": _dir_bytes(out_dir)}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _child(argv: list[str]) -> None:
    """Run one CLI command in this process; print its wall time and peak RSS as JSON."""
    begin = time.perf_counter()
    import bridge.convert  # noqa: F401  (library start-up: torch, Megatron-Core, transformers)
    from bridge.cli import main

    _cold_page_cache()  # after start-up, as cp's is dropped just before cp: both start alike
    start = time.perf_counter()
    code = main(argv + ["--quiet"])
    seconds = time.perf_counter() - start
    peak_rss = peak_resident_bytes()
    print(json.dumps({"code": code, "seconds": seconds, "startup": start - begin, "peak_rss": peak_rss}))


def _run_child(argv: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(argv[:1])} failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(lines[-1])
    if result["code"]:
        raise RuntimeError(f"{argv[0]} exited with {result['code']}: {done.stderr.strip().splitlines()[-1:]}")
    return result


def _cold_page_cache() -> bool:
    """Write back dirty pages and drop the page cache (Linux, root); False where not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _same_bytes(a: str, b: str) -> bool:
    from bridge.safetensors_io import SafetensorsCheckpoint

    left, right = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    if sorted(left.names()) != sorted(right.names()):
        return False
    for name in left.names():
        x, y = left.get(name), right.get(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)):
            return False
    return True


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return 0
    parser = ArgumentParser(prog="convert_bench.py", description=__doc__)
    parser.add_argument("--size-gb", type=float, default=4.0, help="source checkpoint size (default 4 GB)")
    parser.add_argument("--source", choices=SOURCES, default="fp8-fp4",
                        help="the source's formats: the release's FP8 and FP4 (default), or bf16 throughout")
    parser.add_argument("--workers", type=int, help="--workers of import and export (default: theirs, the cores)")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(sys.argv[1:])
    if args.size_gb <= 0:
        raise UsageError(f"--size-gb {args.size_gb} must be > 0")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be >= 1")
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    quantised = args.source == "fp8-fp4"
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dsv4-convert-bench-", dir=args.workdir)
    hf, mcore, exported, copied = (os.path.join(work, d) for d in ("hf", "mcore", "exported", "cp"))
    try:
        start = time.perf_counter()
        made = make_synthetic_checkpoint(hf, args.size_gb, quantised=quantised)
        print(f"synthetic {args.source} checkpoint: {made['bytes'] / GB:.2f} GB, {made['experts']} experts x 2 layers, "
              f"{made['files']} file(s), made in {time.perf_counter() - start:.0f} s")

        cold = _cold_page_cache()
        start = time.perf_counter()
        subprocess.run(["cp", "-r", hf, copied], check=True)
        subprocess.run(["sync"], check=True)
        cp_seconds = time.perf_counter() - start
        shutil.rmtree(copied)

        imported = _run_child(["import", "--hf", hf, "--out", mcore, "--dtype", "bf16", *workers])
        export = _run_child(["export", "--mcore", mcore, "--out", exported, "--dtype", "source", *workers])
        identical = _same_bytes(hf, exported)
        source_gb = made["bytes"] / GB
        mcore_gb = _dir_bytes(mcore) / GB
        largest = max(_numel(s) * 2 for s, _ in _official_shapes(_flash_config(made["experts"], quantised)).values())
        largest /= GB
        page_cache = ("dropped before each step" if cold
                      else "kept (dropping it needs root): sources may be read from memory")
        print(f"cp -r + sync : {source_gb:.2f} GB in {cp_seconds:.1f} s = {source_gb / cp_seconds:.2f} GB/s; "
              f"conversions with {args.workers or default_workers()} worker(s); page cache {page_cache}")
        for label, result, written in (("import", imported, mcore_gb), ("export", export, _dir_bytes(exported) / GB)):
            print(f"{label:13s}: {source_gb:.2f} GB source -> {written:.2f} GB written in {result['seconds']:.1f} s"
                  f" = {source_gb / result['seconds']:.2f} GB/s of source, {written / result['seconds']:.2f} GB/s "
                  f"written; {cp_seconds / result['seconds']:.2f}x cp's speed; peak RSS "
                  f"{result['peak_rss'] / GB:.2f} GB (+{result['startup']:.1f} s library start-up)")
        print(f"largest tensor (bf16): {largest:.2f} GB; round trip bit-identical: {identical}")
        return 0 if identical else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    run_main("convert_bench.py", lambda: sys.exit(main()))

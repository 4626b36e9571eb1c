"""The main job: a tiny DeepSeek-V4 checkpoint through the whole conversion, with a short report.

    python examples/main_job.py [--workdir DIR [--force]] [--keep]

1. makes a tiny official checkpoint (names and config) stored like the release: FP8 e4m3
   attention and shared-expert weights with 128x128 E8M0 block scales, FP4 e2m1
   routed experts with E8M0 scales per 32 inputs, bf16/fp32 tensors, int64 tid2eid,
   an MTP layer, in two safetensors shards;
2. imports it (`python -m bridge import`) into a Megatron-Core torch_dist checkpoint;
3. verifies it (`python -m bridge verify`): Megatron-Core's layers, one at a time, and the logits
   against transformers' DeepSeek-V4 modules on the same checkpoint;
4. exports it back (`python -m bridge export --dtype source`);
5. checks the round trip: every tensor of the export has the source's bytes.
Exits non-zero on any mismatch.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from megatron_v4.runtime.command_line import ArgumentParser, UsageError, run_main

TOLERANCE = 1e-4
"""Largest max |diff| of a layer's outputs or the logits, relative to max |reference| (both sides compute in fp32)."""


def compare(source_dir: Path, exported_dir: Path) -> tuple[int, list[str]]:
    """(tensors compared, names whose dtype, shape or bytes differ or that are missing on one side)."""
    import torch

    from bridge.safetensors_io import SafetensorsCheckpoint

    def _bytes(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    source, exported = SafetensorsCheckpoint(source_dir), SafetensorsCheckpoint(exported_dir)
    names = sorted(set(source.names()) | set(exported.names()))
    bad = []
    for name in names:
        if name not in source.names() or name not in exported.names():
            bad.append(name)
            continue
        a, b = source.get(name), exported.get(name)
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bytes(a), _bytes(b)):
            bad.append(name)
    return len(names), bad


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="main_job.py", description=__doc__)
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--force", action="store_true", help="replace the checkpoints a previous run left in --workdir")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--seq-len", type=int, default=140, help="verify sequence length (140 spans the HCA ratio)")
    args = parser.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dsv4-main-job-"))
    hf, mcore, exported = work / "tiny-dsv4-hf", work / "tiny-dsv4-mcore", work / "tiny-dsv4-exported"
    left = [str(path) for path in (hf, mcore, exported) if path.exists()]
    if left and not args.force:
        raise UsageError(f"--workdir {work} holds {left[0]} from an earlier run; pass --force to replace it")
    for path in left:
        shutil.rmtree(path)
    # After the argument checks: importing PyTorch, Megatron-Core and transformers takes seconds.
    import torch

    from bridge import convert, verify
    from bridge.tiny import make_tiny_checkpoint

    start = time.perf_counter()
    try:
        make_tiny_checkpoint(hf, quantised=True, max_shard_bytes=200_000)
        imported = convert.import_checkpoint(hf, mcore, torch.bfloat16, progress=False)
        report = verify.verify(hf, mcore, sequences=2, seq_len=args.seq_len, progress=False)
        export = convert.export_checkpoint(mcore, exported, "source", progress=False)
        compared, differing = compare(hf, exported)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    worst = max(report.comparisons, key=lambda c: c.relative)
    logits_ok = worst.relative <= TOLERANCE and report.argmax_agreement == 1.0
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(imported.quantised.items()))
    print("DeepSeek-V4 conversion main job")
    print(f"  checkpoint : {imported.tensors} tensors ({kinds}), MTP, official naming, 2+ shards")
    print(f"  import     : -> Megatron-Core torch_dist (bf16), {imported.written_bytes / 1e6:.2f} MB")
    print(f"  verify     : {report.sequences}x{report.seq_len} tokens vs transformers, {len(report.layers)} layers one "
          f"by one: largest max |diff| / max |reference| {worst.relative:.2e} ({worst.part}), logits min cosine "
          f"{report.min_cosine:.6f}, argmax agreement {report.argmax_agreement:.3f}  {'OK' if logits_ok else 'MISMATCH'}")
    print(f"  export     : {export.quantised_tensors} tensors re-quantised to FP8/FP4, "
          f"{export.fresh_scale_blocks} blocks needed a fresh scale")
    print(f"  round trip : {compared - len(differing)}/{compared} safetensors entries bit-identical"
          f"{'' if not differing else ' (differ: ' + ', '.join(differing[:5]) + ')'}  "
          f"{'OK' if not differing else 'MISMATCH'}")
    print(f"  time       : {time.perf_counter() - start:.1f} s")
    if args.keep or args.workdir:
        print(f"  files      : {work}")
    ok = logits_ok and not differing
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    run_main("main_job.py", lambda: sys.exit(main(sys.argv[1:])))

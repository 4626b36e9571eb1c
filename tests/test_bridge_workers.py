"""Conversion with `--workers N`: the same bytes at every worker count, a Megatron-Core checkpoint of one
`.distcp` file per worker that Megatron-Core's own loader reads, and no target after a killed run.

The references are the source checkpoint's bytes and its dequantised tensors fused in memory,
not an earlier run of the file conversion.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_bridge_convert import SHARD_BYTES, SMALL_BLOCK, assert_bit_identical, official_tensors

import megatron_v4
from bridge import convert
from bridge.cli import main as cli
from bridge.conversion_plan import ConversionPlan
from bridge.hf_config import read_hf_config, transformer_config
from bridge.hf_source import HFSource
from bridge.tiny import make_tiny_checkpoint, tiny_config
from megatron_v4.model import DeepSeekV4Model


def _distcp_files(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".distcp"))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_round_trip_gives_back_every_byte_at_any_worker_count(tmp_path, workers):
    hf, mcore, exported = tmp_path / "hf", tmp_path / "mcore", tmp_path / "exported"
    make_tiny_checkpoint(hf, seed=3, quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES)
    assert cli(["import", "--hf", str(hf), "--out", str(mcore), "--quiet", "--workers", str(workers)]) == 0
    assert _distcp_files(mcore) == [f"__0_{i}.distcp" for i in range(workers)]
    assert cli(["export", "--mcore", str(mcore), "--out", str(exported), "--quiet", "--workers", str(workers),
                "--max-shard-gb", "0.00005"]) == 0
    assert len([f for f in os.listdir(exported) if f.endswith(".safetensors")]) > workers
    assert_bit_identical(official_tensors(hf), official_tensors(exported))


def test_multi_worker_import_loads_with_megatron_core(tmp_path):
    from megatron.core import dist_checkpointing

    hf, mcore = tmp_path / "hf", tmp_path / "mcore"
    make_tiny_checkpoint(hf, seed=5, quantised=True, fp8_block=SMALL_BLOCK)
    convert.import_checkpoint(hf, mcore, torch.float32, progress=False, workers=3)
    assert len(_distcp_files(mcore)) == 3
    source = HFSource(hf)
    expected = dict(ConversionPlan().fuse((name, source.read(name)[0]) for name in source.names()))
    record = convert.SourceRecord.load(mcore)
    config = read_hf_config(mcore / convert.RECORD_DIR)
    megatron_v4.initialize()
    try:
        model = DeepSeekV4Model(transformer_config(config, torch.float32, mtp_num_layers=record.mtp_num_layers),
                                max_sequence_length=config.max_position_embeddings)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(mcore))
    finally:
        megatron_v4.destroy()
    assert set(expected) <= set(loaded)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name


def _wait_for(condition, process, log) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not condition():
        assert process.poll() is None, f"it ended before it was killed: {log.read_text()}"
        time.sleep(0.002)
    assert process.poll() is None, "it finished before it could be killed"


@pytest.mark.parametrize("command", ["import", "export"])
def test_killed_multi_worker_conversion_leaves_no_target(tmp_path, command):
    hf, mcore, out = tmp_path / "hf", tmp_path / "mcore", tmp_path / "out"
    make_tiny_checkpoint(hf, cfg=tiny_config(num_routed_experts=64, moe_intermediate_size=128), seed=7)
    if command == "import":
        argv = ["import", "--hf", str(hf)]

        def writing():  # two workers have written into their own files
            return any(sum(os.path.getsize(p / f) > 0 for f in _distcp_files(p)) >= 2 for p in _partial(tmp_path))
    else:
        convert.import_checkpoint(hf, mcore, progress=False, workers=2)
        argv = ["export", "--mcore", str(mcore), "--max-shard-gb", "0.0002"]

        def writing():
            return any(f.endswith(".safetensors.partial") for p in _partial(tmp_path) for f in os.listdir(p))
    log = tmp_path / "log"
    # a fresh process: not this one's torch.distributed rendezvous variables
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "bridge", *argv, "--out", str(out), "--workers", "3"],
                                   stdout=stream, stderr=stream, env=env)
        _wait_for(writing, process, log)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()
    assert _partial(tmp_path)
    # The next run to the same target cleans up what the killed one left behind.
    assert cli([*argv, "--out", str(out), "--quiet", "--workers", "3"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    if command == "export":
        assert_bit_identical(official_tensors(hf), official_tensors(out))
    else:
        assert len(_distcp_files(out)) == 3


def _partial(directory) -> list:
    return [p for p in directory.iterdir() if p.name.startswith(".out.partial-")]

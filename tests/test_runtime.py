"""initialize()/destroy() and the rank harness."""

import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

import megatron_v4
import parallel_gpt as pg
from megatron_v4.runtime.ranks import RankFailure, free_port, run_on_ranks


def test_initialize_in_plain_process_and_reinitialize():
    layout = megatron_v4.initialize(seed=3)
    try:
        assert dist.get_world_size() == 1 and layout.backend == "gloo"
        assert layout.config_kwargs()["tensor_model_parallel_size"] == 1
        with pytest.raises(RuntimeError, match="already called"):
            megatron_v4.initialize()
    finally:
        megatron_v4.destroy()
    assert not dist.is_initialized()
    megatron_v4.initialize()
    megatron_v4.destroy()
    # Nothing that would make a subprocess think it is part of a job.
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & os.environ.keys()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=2), "not divisible by tp\\*pp"),
        (dict(ep=2), "not divisible by etp\\*ep\\*pp"),
        (dict(sp=True), "sp=True needs tp > 1"),
        (dict(tp=0), "must be >= 1"),
    ],
)
def test_layouts_that_do_not_fit_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        megatron_v4.initialize(**kwargs)
    assert not dist.is_initialized()
    megatron_v4.initialize()
    megatron_v4.destroy()


def test_ranks_join_one_group_with_layout():
    results = run_on_ranks(pg.world_and_layout, 4, dict(tp=2))
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert all(r[1] == 2 for r in results)
    assert [r[2] for r in results] == [0, 1, 0, 1]


def test_failing_rank_reports_its_traceback_without_waiting_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 failed(.|\n)*deliberate failure on rank 1"):
        run_on_ranks(pg.fail_while_peer_waits, 2, 1, timeout=120)
    assert time.monotonic() - start < 60


def test_rank_that_dies_is_reported():
    with pytest.raises(RankFailure, match="rank 1 died with exit code 3"):
        run_on_ranks(pg.die_while_peer_waits, 2, timeout=120)


def test_hanging_ranks_time_out():
    with pytest.raises(RankFailure, match="timed out after 3s waiting for ranks \\[0, 1\\]"):
        run_on_ranks(pg.sleep_forever, 2, timeout=3)


def test_initialize_under_torchrun(tmp_path):
    probe = os.path.join(os.path.dirname(__file__), "torchrun_probe.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port", str(free_port()), probe, str(tmp_path)],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert lines == ["rank 0 tp_rank 0 tp_sum 1 backend gloo", "rank 1 tp_rank 1 tp_sum 1 backend gloo"]


"""Run a function on N local ranks (gloo) and collect what each returns.

Used by the test-suite; also handy for trying a parallel layout on a laptop.
A rank that raises or dies makes the whole call fail with that rank's
traceback; a rank that hangs (waiting in a collective for a dead peer) is
killed when the timeout expires. Nothing is left running either way.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import signal
import socket
import time
import traceback
from typing import Any, Callable

import torch

_PRELOAD = ["torch", "megatron.core", "megatron_v4"]


class RankFailure(RuntimeError):
    """One rank raised, died or timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, results, args, kwargs, threads):
    # A process group of its own, so that the parent can kill the rank together with
    # any helper processes it started (dist_checkpointing's writer manager, say).
    os.setpgrp()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    try:
        value = fn(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    timeout: float = 300.0,
    **kwargs,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on `world_size` spawned ranks; return the results by rank.

    `fn` must be importable (a module-level function). Each rank sees
    RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, so `megatron_v4.initialize()` inside
    it joins the group. Raises `RankFailure` with the first failing rank's
    traceback, or a timeout message naming the ranks that did not finish.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, results, args, kwargs, threads),
            # Not daemonic: ranks may start processes of their own (dist_checkpointing's
            # writers do); the `finally` below kills whatever is left.
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < world_size:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in outputs and not p.is_alive() and p.exitcode not in (0, None)
                ]
                if dead:
                    # Give a rank that died a moment to have its report delivered.
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue.Empty:
                        raise RankFailure(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                            f"without reporting (killed, out of memory, or a crash in native code)"
                        ) from None
                elif time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in outputs]
                    raise RankFailure(
                        f"timed out after {timeout:.0f}s waiting for ranks {missing} "
                        f"(a hang in a collective, usually because a peer failed)"
                    )
                else:
                    continue
            if status == "error":
                # A peer that died silently is the root cause of a collective error here.
                time.sleep(0.5)
                dead = [
                    f"rank {r} died with exit code {p.exitcode}; "
                    for r, p in enumerate(procs)
                    if r != rank and not p.is_alive() and p.exitcode not in (0, None)
                ]
                raise RankFailure(f"{''.join(dead)}rank {rank} failed:\n{payload}")
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        if len(outputs) == world_size:
            # Let finished ranks exit normally so they shut down their own helpers.
            for p in procs:
                p.join(timeout=30)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.join(timeout=5)
        results.close()
    return [outputs[r] for r in range(world_size)]

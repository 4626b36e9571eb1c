"""Conversion work spread over threads: one queue of jobs, taken in order, and the first error stops all.

Threads, not processes: the work is torch's copies and arithmetic, SHA-256 and file
I/O, which release the GIL, and threads share the plan, the open checkpoints and
the progress bar without start-up cost or pickling (a forked child of a process that
has used torch's thread pools may hang; a spawned one pays torch's start-up again).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable


def default_workers() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Jobs:
    """A thread-safe queue of jobs, taken in their order; `stop()` empties it."""

    def __init__(self, jobs: Iterable):
        self._jobs = iter(jobs)
        self._lock = threading.Lock()

    def take(self):
        """The next job, or None when there are none left."""
        with self._lock:
            return next(self._jobs, None)

    def stop(self) -> None:
        with self._lock:
            self._jobs = iter(())


def run_workers(work: Callable[[int], None], workers: int, jobs: Jobs) -> None:
    """`work(0)` ... `work(workers - 1)` in threads, each taking from `jobs`; the first error (or Ctrl-C)
    empties `jobs`, so the others stop after their current job, and is raised once all have ended."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            jobs.stop()

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.1)  # a timed join lets Ctrl-C reach this thread
    finally:
        jobs.stop()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]

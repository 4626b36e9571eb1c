"""A one-line progress report of a conversion: tensors and bytes done, rate (to stderr)."""

from __future__ import annotations

import sys
import threading
import time

GB = 1e9


class Progress:
    def __init__(self, label: str, total_tensors: int, total_bytes: int, enabled: bool = True, every_s: float = 0.5):
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, total_bytes
        self.enabled = enabled
        self.every_s = every_s
        self.tensors = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()  # conversion workers update one bar from several threads

    def update(self, nbytes: int, tensors: int = 1) -> None:
        with self._lock:
            self.tensors += tensors
            self.bytes += nbytes
            now = time.monotonic()
            if now - self._last >= self.every_s:
                self._last = now
                self._print(end="\r")

    def close(self) -> None:
        self._print(end="\n")

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def _print(self, end: str) -> None:
        if not self.enabled:
            return
        rate = self.bytes / GB / max(self.seconds, 1e-9)
        line = (f"[{self.label}] {self.tensors}/{self.total_tensors} tensors, "
                f"{self.bytes / GB:.2f}/{self.total_bytes / GB:.2f} GB, {rate:.2f} GB/s")
        print(line.ljust(78), end=end, file=sys.stderr, flush=True)

"""This process's memory as Linux reports it in /proc/self/status (the tools' and benchmarks' RSS figures).

VmHWM, the peak resident size, is used rather than `ru_maxrss`, which a process inherits across exec from
its parent: a converter started from a big Python process would report the parent's peak.
"""

from __future__ import annotations

import resource


def status_kib(field: str) -> int | None:
    """A /proc/self/status field in KiB (`VmRSS`, `VmHWM`, ...); None where the file or field is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_resident_bytes() -> int:
    """This process's peak resident memory: VmHWM, or `ru_maxrss` where there is no /proc."""
    peak = status_kib("VmHWM")
    return (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

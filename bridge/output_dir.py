"""Writing a conversion's output so that it appears complete or not at all.

Everything is written into a temporary directory beside the target (same file
system, so the final rename is atomic); a failed or killed conversion leaves no
target directory. An existing target is refused unless `force` is given. The
temporary directory carries the writer's process id, so that the next
conversion to the same target removes what a killed one left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class OutputExistsError(FileExistsError):
    def __str__(self) -> str:
        return str(self.args[0])


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, force: bool = False):
    """Yields a fresh temporary directory that becomes `target` when the block completes without error."""
    target = os.path.abspath(os.fspath(target))
    if os.path.lexists(target) and not force:
        raise OutputExistsError(f"{target} already exists; choose another output or pass --force to replace it")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(target)}.partial-"
    _remove_abandoned(parent, prefix)
    temporary = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        yield temporary
        _fsync_dir(temporary)
        if os.path.lexists(target):
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.replace(target, os.path.join(retired, "previous"))
            os.replace(temporary, target)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, target)
        _fsync_dir(parent)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)


def _remove_abandoned(parent: str, prefix: str) -> None:
    """Delete `prefix<pid>-*` directories whose writing process no longer exists (killed conversions)."""
    for name in os.listdir(parent):
        pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

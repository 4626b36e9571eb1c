"""Writing a conversion's output so that it appears complete or not at all.

Everything is written into a temporary directory beside the target (same file
system, so the final rename is atomic); a failed or killed conversion leaves no
target directory. An existing target is refused unless `force` is given.
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
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

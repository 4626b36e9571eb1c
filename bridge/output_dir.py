"""Writing a conversion's output so that it appears complete or not at all, and never over what it must not.

`unsafe_target` refuses an output that would replace something precious: an empty
path (an unset shell variable), the current, root or home directory, or a directory
that is, holds or lies inside an input. `atomic_output_dir` then

- holds an exclusive lock (`.<target>.lock` beside the target, `flock(2)`) for the whole
  run, so that two conversions never write one target;
- writes everything into a temporary directory beside the target (same file system),
  fsyncs every file in it and the directory itself;
- puts it in place with one `renameat2(2)` call: `RENAME_NOREPLACE` without `force`, so a
  target that appeared during the run is refused, never replaced; `RENAME_EXCHANGE` with
  `force`, so the old and new checkpoints swap atomically (no moment without a target);
  the old one, now under the temporary name, is then deleted.

A killed conversion leaves at most its temporary directory (named after its process id)
and the lock file; the next conversion to the same target deletes both (and puts back a
target that an earlier version's two-rename swap left in `.<target>.old-*/previous`). A failed one
deletes its temporary directory. See https://man7.org/linux/man-pages/man2/rename.2.html.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import tempfile

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
"""`renameat2(2)` flags (linux/fs.h)."""
AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    def __str__(self) -> str:
        return str(self.args[0])


def unsafe_target(target: str, inputs: list[str]) -> str | None:
    """Why `target` must not be written (replaced) by a conversion reading `inputs`; None if it may."""
    if not target.strip():
        return "--out is empty (an unset shell variable?); give the directory to create"
    real = os.path.realpath(target)
    for precious, what in ((os.getcwd(), "the current directory"), (os.path.expanduser("~"), "the home directory"),
                           (os.path.abspath(os.sep), "the root directory")):
        if real == os.path.realpath(precious):
            return f"--out {target} is {what}; give a new directory to create"
    for source in inputs:
        src = os.path.realpath(source)
        if real == src or _inside(src, real) or _inside(real, src):
            return f"--out {target} overlaps the input {source}; write the output elsewhere"
    return None


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, force: bool = False, inputs: tuple = ()):
    """Yields a fresh temporary directory that becomes `target` when the block completes without error."""
    reason = unsafe_target(os.fspath(target), [os.fspath(i) for i in inputs])
    if reason:
        raise ValueError(reason)
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    with _locked(os.path.join(parent, f".{os.path.basename(target)}.lock"), target):
        _recover_two_rename_swap(parent, target)
        if os.path.lexists(target) and not force:
            raise _exists(target)
        prefix = f".{os.path.basename(target)}.partial-"
        _remove_abandoned(parent, prefix)
        temporary = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
        try:
            yield temporary
            os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output honours the umask
            _fsync_tree(temporary)
            _put_in_place(temporary, target, force)
            _fsync_dir(parent)
        finally:
            if os.path.lexists(temporary):
                shutil.rmtree(temporary)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exists(target: str) -> OutputExistsError:
    return OutputExistsError(f"{target} already exists; choose another output or pass --force to replace it")


@contextlib.contextmanager
def _locked(lock_file: str, target: str):
    """Hold an exclusive lock on `lock_file` (created if need be, deleted at the end) or refuse at once."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputExistsError(f"{target}: another conversion is writing it; wait for it to finish") from None
        if not os.path.exists(lock_file) or os.stat(lock_file).st_ino != os.fstat(fd).st_ino:
            raise OutputExistsError(f"{target}: another conversion just finished writing it; run again")
        try:
            yield
        finally:
            os.unlink(lock_file)
    finally:
        os.close(fd)


def _put_in_place(temporary: str, target: str, force: bool) -> None:
    """`temporary` becomes `target`; with `force` an existing target is swapped out into `temporary`."""
    exchange = force and os.path.lexists(target)
    try:
        _renameat2(temporary, target, RENAME_EXCHANGE if exchange else RENAME_NOREPLACE)
    except FileExistsError:
        raise _exists(target) from None


def _renameat2(source: str, destination: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(destination), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot move the finished output into place ({os.strerror(code)})", destination)


def _recover_two_rename_swap(parent: str, target: str) -> None:
    """Earlier versions replaced a target in two renames, through `.<target>.old-*/previous`; a kill between
    them left the old checkpoint there and no target. Put it back, or delete it if the target is whole."""
    prefix = f".{os.path.basename(target)}.old-"
    for name in sorted(os.listdir(parent)):
        previous = os.path.join(parent, name, "previous")
        if name.startswith(prefix):
            if not os.path.lexists(target) and os.path.lexists(previous):
                os.rename(previous, target)
            shutil.rmtree(os.path.join(parent, name))


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


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under `root` (the data reaches the disk before the rename)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(directory)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

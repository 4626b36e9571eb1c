"""How the project's command-line tools behave, in one place.

- Arguments are checked before PyTorch, Megatron-Core or transformers are imported, so `--help` and
  a mistake answer at once; this module imports nothing heavy.
- A mistake is one line on stderr, `<tool>: error: <what is wrong>; <how to fix it>`, exit code 2
  (usage) or 1 (the work failed); `--verbose` (or MEGATRON_V4_VERBOSE=1) shows library warnings and
  the traceback instead. Ctrl-C is one line too, exit code 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from megatron_v4.runtime.quiet import VERBOSE_ENV, quiet_known_warnings, verbose

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line or its inputs (exit code 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors and a `--verbose` flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="show library warnings and full tracebacks")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (--help lists the options)\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        if parsed.verbose:
            os.environ[VERBOSE_ENV] = "1"
        quiet_known_warnings()
        return parsed


def world_size() -> int:
    """The number of processes of this job, as torchrun announces it (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(script: str, **sizes: int) -> None:
    """Refuse model-parallel sizes whose product exceeds the processes started, naming the launch."""
    needed = 1
    for name, size in sizes.items():
        if size < 1:
            raise UsageError(f"--{name} {size} must be >= 1")
        needed *= size
    if needed > world_size():
        flags = " ".join(f"--{name} {size}" for name, size in sizes.items() if size > 1)
        raise UsageError(
            f"{flags} needs {needed} processes but this job has {world_size()}; "
            f"launch it with: torchrun --nproc-per-node {needed} {script} {flags} ..."
        )


def existing_directory(path: str, flag: str, expect: str = "config.json") -> str:
    """`path` if it is a directory holding `expect`; otherwise a one-line usage error."""
    if not path:
        raise UsageError(f"{flag} is empty; give a directory")
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: no such directory")
    if expect and not os.path.exists(os.path.join(path, expect)):
        raise UsageError(f"{flag} {path}: no {expect} in it; is it the right directory?")
    return path


def read_json(path: str, flag: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno})") from e


def one_line(error: BaseException) -> str:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    known = isinstance(error, (UsageError, OSError, ValueError, KeyError, RuntimeError, NotImplementedError))
    return ("" if known else type(error).__name__ + ": ") + " ".join(message.split())


def run_main(prog: str, main: Callable[[], object]) -> NoReturn:
    """Run a tool's `main()` and turn every failure into one line and an exit code."""
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except BaseException as e:  # torch.distributed's CheckpointException is a BaseException
        if verbose():
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for the job, not one per rank
            sys.stderr.write(f"{prog}: error: {one_line(e)}\n")
        sys.exit(EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED)
    sys.exit(0)

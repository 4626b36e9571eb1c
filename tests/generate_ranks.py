"""Rank function of tests/test_generate.py: examples/generate.py's main at several layouts."""

from __future__ import annotations

import importlib.util
import os

import torch.distributed as dist

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "generate.py")


def load_generate_example():
    """examples/generate.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_at_layouts(prompt: list[int], new_tokens: int, runs: list[list[str]]) -> list[list[int]]:
    """The greedy new tokens of `generate.py` for each run's flags (checkpoint and layout)."""
    # The rank holds the process group itself, so each main() only sets up and tears down its layout.
    dist.init_process_group("gloo")
    example = load_generate_example()
    ids = ",".join(map(str, prompt))
    common = ["--prompt-ids", ids, "--max-new-tokens", str(new_tokens), "--greedy", "--ignore-eos"]
    return [example.main(common + flags)["tokens"] for flags in runs]

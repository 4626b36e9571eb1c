"""Where things lie in a Megatron-Core checkpoint directory of this project (imports nothing heavy).

Two kinds of directory hold model weights:
- an import (`python -m bridge import --out DIR`): the `torch_dist` files, and `dsv4_bridge/` with the
  architecture (`config.json`), the source tensors' formats (`source.json`) and their original
  FP8/FP4 scales (`scales/`) and the tensors of parts it does not build (`carried/`);
- a training save directory (`pretrain.py --save DIR`), laid out as Megatron-LM lays it out:
  `latest_checkpointed_iteration.txt` and one `iter_NNNNNNN/` per checkpoint, each a `torch_dist`
  checkpoint (model, optimizer, scheduler, RNG, data position) with its own `dsv4_bridge/`.
`resolve_checkpoint` turns either (or one `iter_*` directory) into the directory to read weights from.
"""

from __future__ import annotations

import os

RECORD_DIR = "dsv4_bridge"
RECORD_FILE = "source.json"
SCALES_DIR = "scales"
SOURCE_FILES_DIR = "source_files"
"""Every file of the source checkpoint but its weights (tokenizer, generation config, chat-encoding files,
README, the `config.json` as written), which export writes back."""
CARRIED_DIR = "carried"
"""Tensors of the source's other parts (a draft head, a vision encoder), kept byte for byte for export."""
CONFIG_FILE = "config.json"
LATEST_FILE = "latest_checkpointed_iteration.txt"
"""Megatron-LM's name for the file holding a save directory's latest iteration."""


def iteration_dir(save_dir: str | os.PathLike, iteration: int) -> str:
    return os.path.join(os.fspath(save_dir), f"iter_{iteration:07d}")


def latest_iteration(save_dir: str | os.PathLike) -> int | None:
    """The latest iteration of a training save directory; None when `save_dir` is not one."""
    path = os.path.join(os.fspath(save_dir), LATEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} holds {text!r}, not an iteration number; the save directory is damaged")
    return int(text)


def saved_iterations(save_dir: str | os.PathLike) -> list[int]:
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return sorted(int(n[5:]) for n in names if n.startswith("iter_") and n[5:].isdigit())


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> str:
    """The directory holding the weights: `path` itself (an import or one iteration of a training run),
    or, for a training save directory, its latest iteration or the one asked for."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    latest = latest_iteration(path)
    if latest is None:
        if iteration is not None:
            raise ValueError(f"{path} is not a training save directory (no {LATEST_FILE}); drop --iteration")
        if not os.path.isfile(os.path.join(path, RECORD_DIR, CONFIG_FILE)):
            raise FileNotFoundError(
                f"{path}: no {RECORD_DIR}/{CONFIG_FILE}; give a directory written by `python -m bridge import` "
                "or by pretrain.py --save"
            )
        return path
    chosen = latest if iteration is None else iteration
    directory = iteration_dir(path, chosen)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{path} has no iteration {chosen}; saved iterations: {saved_iterations(path) or 'none'}"
        )
    return directory

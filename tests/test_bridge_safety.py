"""Hostile and careless inputs to `python -m bridge import|export|verify`, one row each.

Every row breaks a good checkpoint (or the command line) one way, runs the command and
asserts its exit code, a single `error:` line naming the culprit, and a workspace left
exactly as it was: nothing written, nothing deleted. The crafted-pickle rows also assert
that the payload did not run. Target races (a lock held, a target appearing during the run,
a `--force` swap) are tested on `atomic_output_dir` directly below the table.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridge import mcore_checkpoint
from bridge.checkpoint_dirs import RECORD_DIR, SCALES_DIR
from bridge.cli import main as cli
from bridge.integrity import CHECKSUMS_FILE
from bridge.output_dir import OutputExistsError, atomic_output_dir
from bridge.safetensors_io import INDEX_FILE
from bridge.tiny import make_tiny_checkpoint

SMALL_BLOCK = (24, 24)
SHARD_BYTES = 40_000
PAYLOAD_MARK = "payload-ran"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A quantised, sharded official checkpoint and its import."""
    root = tmp_path_factory.mktemp("sources")
    make_tiny_checkpoint(root / "hf", seed=6, quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES)
    assert cli(["import", "--hf", str(root / "hf"), "--out", str(root / "mcore"), "--quiet"]) == 0
    return root


# --- ways to break things -------------------------------------------------------------------------------
def _index(hf) -> dict:
    return json.loads((hf / INDEX_FILE).read_text())


def _edit_shard(hf, holding: str, change) -> None:
    """Apply `change(tensors)` to the shard that holds `holding`; the index is left as it was."""
    shard = hf / _index(hf)["weight_map"][holding]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard)


def _retype(name: str, dtype: torch.dtype):
    return lambda hf: _edit_shard(hf, name, lambda t: t.update({name: t[name].to(dtype)}))


def _set_values(name: str, value):
    def change(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
    return lambda hf: _edit_shard(hf, name, change)


def _set_config(**changes):
    def breaker(hf):
        config = json.loads((hf / "config.json").read_text())
        config.update(changes)
        (hf / "config.json").write_text(json.dumps(config))
    return breaker


def _same_tensor_in_two_shards(hf):
    index = _index(hf)["weight_map"]
    other = next(f for f in sorted(set(index.values())) if f != index["norm.weight"])
    tensors = load_file(hf / other)
    save_file({**tensors, "norm.weight": torch.full_like(load_file(hf / index["norm.weight"])["norm.weight"], 2)},
              hf / other)


def _index_entry_outside(hf):
    index = _index(hf)
    elsewhere = hf.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(hf / index["weight_map"]["norm.weight"], elsewhere / "x.safetensors")
    index["weight_map"]["norm.weight"] = "../elsewhere/x.safetensors"
    (hf / INDEX_FILE).write_text(json.dumps(index))


def _unindexed(hf):
    index = _index(hf)
    del index["weight_map"]["norm.weight"]
    (hf / INDEX_FILE).write_text(json.dumps(index))


def _crafted_metadata(mcore):
    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(mcore.parent / PAYLOAD_MARK),)

    (mcore / ".metadata").write_bytes(pickle.dumps(Payload()))


def _flip_a_bit(mcore):
    """One bit in the middle of the word embedding's record (its data dominates the record; export and verify
    both read it, whichever worker's `.distcp` file holds it)."""
    index, info = next((index, info) for index, info in mcore_checkpoint.read_metadata(mcore).storage_data.items()
                       if index.fqn.endswith("word_embeddings.weight"))
    path = mcore / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 1
    path.write_bytes(data)


def _edit_record(path: str):
    return lambda mcore: (mcore / RECORD_DIR / path).write_text('{"format": "x"}')


def _nan_import(tmp):
    """An import (with --allow-nonfinite) of a checkpoint holding a NaN in an FP8-stored tensor."""
    _set_values("layers.0.attn.wkv.weight", float("nan"))(tmp / "hf")
    assert cli(["import", "--hf", str(tmp / "hf"), "--out", str(tmp / "mcore"), "--quiet", "--force",
                "--allow-nonfinite"]) == 0


IMPORT = ["import", "--hf", "{hf}", "--out", "{out}", "--quiet"]
EXPORT = ["export", "--mcore", "{mcore}", "--out", "{out}", "--quiet"]
VERIFY = ["verify", "--hf", "{hf}", "--mcore", "{mcore}", "--sequences", "1", "--seq-len", "8", "--quiet"]

CASES = {
    # id: (what is broken: "hf" or "mcore", breaker, command, exit code, named in the error line)
    "out-empty-force": (None, None, ["import", "--hf", "{hf}", "--out", "", "--force"], 2, "--out is empty"),
    "out-current-dir-force": (None, None, ["import", "--hf", "{hf}", "--out", ".", "--force"], 2,
                              "current directory"),
    "out-is-input-force": (None, None, ["import", "--hf", "{hf}", "--out", "{hf}", "--force"], 2, "overlaps"),
    "out-holds-input-force": (None, None, ["import", "--hf", "{hf}", "--out", "{tmp}", "--force"], 2, "overlaps"),
    "out-inside-input": (None, None, ["import", "--hf", "{hf}", "--out", "{hf}/sub"], 2, "overlaps"),
    "export-out-is-mcore-force": (None, None, ["export", "--mcore", "{mcore}", "--out", "{mcore}", "--force"], 2,
                                  "overlaps"),
    "max-shard-gb-negative": (None, None, [*EXPORT, "--max-shard-gb", "-1"], 2, "--max-shard-gb"),
    "crafted-metadata-export": ("mcore", _crafted_metadata, EXPORT, 1, ".metadata"),
    "crafted-metadata-verify": ("mcore", _crafted_metadata, VERIFY, 1, ".metadata"),
    "scales-deleted": ("mcore", lambda m: shutil.rmtree(m / RECORD_DIR / SCALES_DIR), EXPORT, 1, SCALES_DIR),
    "checksums-deleted": ("mcore", lambda m: os.remove(m / RECORD_DIR / CHECKSUMS_FILE), EXPORT, 1, CHECKSUMS_FILE),
    "record-edited": ("mcore", _edit_record("source.json"), EXPORT, 1, "source.json"),
    "distcp-bit-flipped": ("mcore", _flip_a_bit, EXPORT, 1, "checksum"),
    "distcp-bit-flipped-verify": ("mcore", _flip_a_bit, VERIFY, 1, "checksum"),
    "distcp-garbage-export": ("mcore", lambda m: (m / "__0_0.distcp").write_bytes(b"\0" * 4096), EXPORT, 1,
                              ".distcp"),
    "distcp-garbage-verify": ("mcore", lambda m: (m / "__0_0.distcp").write_bytes(b"\0" * 4096), VERIFY, 1,
                              ".distcp"),
    "unindexed-tensor": ("hf", _unindexed, IMPORT, 1, "norm.weight"),
    "tensor-in-two-shards": ("hf", _same_tensor_in_two_shards, IMPORT, 1, "norm.weight"),
    "index-entry-outside": ("hf", _index_entry_outside, IMPORT, 1, "outside"),
    "index-not-json": ("hf", lambda hf: (hf / INDEX_FILE).write_text("{"), IMPORT, 1, INDEX_FILE),
    "wrong-rank-right-size": ("hf", lambda hf: _edit_shard(hf, "norm.weight", lambda t: t.update(
        {"norm.weight": t["norm.weight"].reshape(8, -1)})), IMPORT, 1, "norm.weight"),
    "fp16-for-bf16": ("hf", _retype("norm.weight", torch.float16), IMPORT, 1, "norm.weight"),
    "fp64-for-fp32": ("hf", _retype("hc_head_fn", torch.float64), IMPORT, 1, "hc_head_fn"),
    "int32-tid2eid": ("hf", _retype("layers.0.ffn.gate.tid2eid", torch.int32), IMPORT, 1, "tid2eid"),
    "tid2eid-99": ("hf", _set_values("layers.0.ffn.gate.tid2eid", 99), IMPORT, 1, "tid2eid"),
    "tid2eid-negative": ("hf", _set_values("layers.0.ffn.gate.tid2eid", -1), IMPORT, 1, "tid2eid"),
    "tid2eid-2e40": ("hf", _set_values("layers.0.ffn.gate.tid2eid", 2 ** 40), IMPORT, 1, "tid2eid"),
    "nan-weight": ("hf", _set_values("norm.weight", float("nan")), IMPORT, 1, "norm.weight"),
    "inf-weight": ("hf", _set_values("hc_head_fn", float("inf")), IMPORT, 1, "hc_head_fn"),
    "experts-1000000": ("hf", _set_config(n_routed_experts=1_000_000), IMPORT, 1, "n_routed_experts"),
    "config-not-json": ("hf", lambda hf: (hf / "config.json").write_text("{"), IMPORT, 1, "config.json"),
    "config-string-for-int": ("hf", _set_config(hidden_size="64"), IMPORT, 1, "hidden_size"),
    "garbage-shard": ("hf", lambda hf: (hf / _index(hf)["weight_map"]["norm.weight"]).write_bytes(b"\x07" * 99),
                      IMPORT, 1, "safetensors"),
}


def _tree(root) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            out[os.path.relpath(path, root)] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
    return out


def _run(argv: list[str]) -> int:
    try:
        return cli(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_nothing_changes(sources, tmp_path, monkeypatch, capsys, case):
    broken, breaker, command, code, named = CASES[case]
    for name in ("hf", "mcore"):
        shutil.copytree(sources / name, tmp_path / name)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "keep.txt").write_text("mine")
    if breaker is not None:
        breaker(tmp_path / broken)
    monkeypatch.chdir(tmp_path / "work")
    before = _tree(tmp_path)
    paths = {"hf": tmp_path / "hf", "mcore": tmp_path / "mcore", "out": tmp_path / "out", "tmp": tmp_path}
    assert _run([arg.format(**paths) for arg in command]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: " in err[0], err
    assert named in err[0], err
    assert _tree(tmp_path) == before
    assert not (tmp_path / PAYLOAD_MARK).exists()


def test_nan_in_a_checkpoint_to_export_is_refused_unless_allowed(sources, tmp_path, capsys):
    shutil.copytree(sources / "hf", tmp_path / "hf")
    _nan_import(tmp_path)
    out = str(tmp_path / "out")
    assert cli(["export", "--mcore", str(tmp_path / "mcore"), "--out", out, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN" in err[0] and "--allow-nonfinite" in err[0], err
    assert not os.path.exists(out)
    assert cli(["export", "--mcore", str(tmp_path / "mcore"), "--out", out, "--quiet", "--allow-nonfinite"]) == 0


def test_full_disk_during_the_write_is_one_line(sources, tmp_path, monkeypatch, capsys):
    save = torch.save

    def no_space(obj, stream, *args, **kwargs):
        if isinstance(stream, io.BytesIO):  # serialising the pickled objects, in memory
            return save(obj, stream, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mcore_checkpoint.torch, "save", no_space)
    assert cli(["import", "--hf", str(sources / "hf"), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    # whichever worker's file (__0_<k>.distcp) hits the full disk first
    assert len(err) == 1 and re.search(r"No space left on device while writing \S+/__0_\d+\.distcp", err[0]), err
    assert os.listdir(tmp_path) == []


# --- the target ------------------------------------------------------------------------------------------
def test_a_target_that_appears_during_the_run_is_kept_and_refused(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(target) as tmp:
            (tmp_path / "out").mkdir()
            (target / "theirs").write_text("theirs")
            open(os.path.join(tmp, "ours"), "w").close()
    assert os.listdir(target) == ["theirs"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_two_conversions_to_one_target_do_not_both_write(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        open(os.path.join(tmp, "first"), "w").close()
        with pytest.raises(OutputExistsError, match="another conversion"):
            with atomic_output_dir(tmp_path / "out", force=True):
                pass
    assert os.listdir(tmp_path / "out") == ["first"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_force_swaps_the_old_target_out_and_leaves_nothing_beside_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with atomic_output_dir(tmp_path / "out", force=True) as tmp:
        open(os.path.join(tmp, "new"), "w").close()
    assert os.listdir(tmp_path / "out") == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_interrupted_two_rename_swap_of_an_earlier_version_is_put_back(tmp_path):
    (tmp_path / ".out.old-abc" / "previous").mkdir(parents=True)
    (tmp_path / ".out.old-abc" / "previous" / "old").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    assert os.listdir(tmp_path / "out") == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["out"]

"""A servable export: what the source checkpoint carries besides weights comes back as it was.

The source has tokenizer files, a generation config, a chat-encoding folder, a README, and a config.json
with metadata keys in a non-alphabetical order. After import and export every one of those files is
byte-identical (config.json too: nothing changed); an export to bf16 changes only the keys it must
(`quantization_config` dropped, `torch_dtype`) and keeps the others in the source's order. Shards come
back at the source's shard size, and the output directory honours the umask."""

from __future__ import annotations

import json
import os
import stat

import pytest

from bridge.cli import main as cli
from bridge.safetensors_io import INDEX_FILE
from bridge.tiny import make_tiny_checkpoint

SIDE_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"bos_token": "<s>", "eos_token": "</s>"}\n',
    "generation_config.json": '{\n  "temperature": 0.6,\n  "top_p": 0.95\n}\n',
    "encoding/encoding_dsv4.py": "# the release's chat encoding\nBOS = '<s>'\n",
    "README.md": "# tiny\n",
}


def _source(tmp_path):
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, seed=0, quantised=True, max_shard_bytes=150_000)
    config = json.loads((hf / "config.json").read_text())
    # The release's own key order (not sorted), with transformers' metadata keys.
    reordered = {"architectures": config.pop("architectures"), "auto_map": {"AutoConfig": "x.Config"},
                 "_name_or_path": "deepseek-ai/tiny", **dict(reversed(list(config.items())))}
    (hf / "config.json").write_text(json.dumps(reordered, indent=2) + "\n")
    for name, text in SIDE_FILES.items():
        (hf / name).parent.mkdir(parents=True, exist_ok=True)
        (hf / name).write_text(text)
    return hf


def _shards(directory) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def test_export_gives_back_every_file_key_order_and_shard_size(tmp_path):
    hf = _source(tmp_path)
    old = os.umask(0o022)
    try:
        assert cli(["import", "--hf", str(hf), "--out", str(tmp_path / "mcore"), "--quiet"]) == 0
        assert cli(["export", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for name in [*SIDE_FILES, "config.json"]:
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755
    largest = max(os.path.getsize(hf / f) for f in _shards(hf))
    # Shards no larger than the source's largest, so about as many (how tensors pack into them may differ).
    assert abs(len(_shards(out)) - len(_shards(hf))) <= 1 and len(_shards(out)) > 1
    assert all(os.path.getsize(out / f) <= 1.1 * largest for f in _shards(out))  # + its header
    assert json.loads((out / INDEX_FILE).read_text())["weight_map"].keys() == \
        json.loads((hf / INDEX_FILE).read_text())["weight_map"].keys()
    print(f"{len(_shards(out))} shards (source {len(_shards(hf))}), largest source shard {largest} bytes")


def test_bf16_export_changes_only_the_keys_it_must(tmp_path):
    hf = _source(tmp_path)
    assert cli(["import", "--hf", str(hf), "--out", str(tmp_path / "mcore"), "--quiet"]) == 0
    assert cli(["export", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "out"), "--dtype", "bf16",
                "--quiet"]) == 0
    source = json.loads((hf / "config.json").read_text())
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" in source and "quantization_config" not in exported
    changed = {k for k in source if k in exported and source[k] != exported[k]}
    assert changed <= {"torch_dtype", "dtype", "expert_dtype"}, changed
    kept = [k for k in source if k in exported]
    assert [k for k in exported if k in source] == kept, "the source's key order is not kept"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("flag", ["--max-shard-gb"])
def test_explicit_shard_size_wins(tmp_path, flag):
    hf = _source(tmp_path)
    assert cli(["import", "--hf", str(hf), "--out", str(tmp_path / "mcore"), "--quiet"]) == 0
    assert cli(["export", "--mcore", str(tmp_path / "mcore"), "--out", str(tmp_path / "out"), flag, "10",
                "--quiet"]) == 0
    assert len(_shards(tmp_path / "out")) == 1

"""Release layouts beyond the base model: a draft head (DeepSeek-V4-Flash-0731, DSpark) and the vision
variant's `model.`-prefixed text weights, carried byte for byte through import and export; config keys
inside nested dicts refused like top-level ones."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bridge.cli import main as cli
from bridge.quantisation import E8M0
from bridge.safetensors_io import INDEX_FILE, SafetensorsCheckpoint, write_safetensors
from bridge.tiny import make_tiny_checkpoint
from bridge.verify import verify

SMALL_BLOCK = (16, 32)
SHARD_BYTES = 40_000
DRAFT_KEYS = {"dspark_block_size": 16, "dspark_markov_rank": 8}


def _draft_head(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors of a draft head under `mtp.*` that no DeepSeek-V4 MTP layer has, one FP8 with its scale."""
    return {
        "mtp.0.main_proj.weight": torch.randn(64, 128, generator=g).bfloat16(),
        "mtp.1.attn.wq_a.weight": torch.randn(32, 64, generator=g).to(torch.float8_e4m3fn),
        "mtp.1.attn.wq_a.scale": torch.randint(120, 130, (2, 2), generator=g, dtype=torch.uint8).view(E8M0),
        "mtp.2.norm.weight": torch.randn(64, generator=g).bfloat16(),
    }


def _add_tensors(directory, tensors: dict[str, torch.Tensor], config_changes: dict) -> None:
    """Add `tensors` in a shard of their own to a sharded checkpoint, and `config_changes` to its config."""
    shard = "model-extra.safetensors"
    write_safetensors(tensors.items(), directory / "extra")
    os.replace(directory / "extra" / "model.safetensors", directory / shard)
    os.rmdir(directory / "extra")
    index = json.loads((directory / INDEX_FILE).read_text())
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    (directory / INDEX_FILE).write_text(json.dumps(index))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_changes}))


def _prefixed(directory, prefix: str) -> None:
    """Put `prefix` before every tensor name of a sharded checkpoint (rewriting its files)."""
    index = json.loads((directory / INDEX_FILE).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = dict(SafetensorsCheckpoint(directory / shard).items())
        os.remove(directory / shard)
        write_safetensors(((prefix + n, t) for n, t in tensors.items()), directory / "tmp")
        os.replace(directory / "tmp" / "model.safetensors", directory / shard)
        os.rmdir(directory / "tmp")
    index["weight_map"] = {prefix + n: f for n, f in index["weight_map"].items()}
    (directory / INDEX_FILE).write_text(json.dumps(index))


def _all_bytes(directory) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    return {name: (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for name, t in SafetensorsCheckpoint(directory).items()}


def _round_trip(hf, tmp_path, capsys) -> tuple[str, str]:
    mcore, exported = tmp_path / "mcore", tmp_path / "exported"
    assert cli(["import", "--hf", str(hf), "--out", str(mcore), "--quiet"]) == 0
    imported = capsys.readouterr().out
    assert cli(["export", "--mcore", str(mcore), "--out", str(exported), "--quiet"]) == 0
    assert _all_bytes(exported) == _all_bytes(hf)
    assert verify(hf, mcore, sequences=1, seq_len=24, progress=False).passed()  # the base model runs as transformers'
    return imported, capsys.readouterr().out


def test_draft_head_release_round_trips_byte_exactly(tmp_path, capsys):
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, seed=4, quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES)
    draft = _draft_head(torch.Generator().manual_seed(0))
    _add_tensors(hf, draft, {**DRAFT_KEYS, "num_nextn_predict_layers": 3, "compress_ratios":
                             json.loads((hf / "config.json").read_text())["compress_ratios"][:-1] + [0, 4, 128]})
    imported, exported = _round_trip(hf, tmp_path, capsys)
    carried = sum(n.startswith("mtp.") for n in SafetensorsCheckpoint(hf).names())
    assert carried > len(draft)  # the standard MTP layer's tensors belong to the draft head too
    assert imported.count("\n") == 2 and f"carried {carried} tensors" in imported
    assert f"{carried} carried tensors written back unchanged" in exported
    record = json.loads((tmp_path / "mcore" / "dsv4_bridge" / "source.json").read_text())
    assert record["mtp_num_layers"] == 0 and not any(n.startswith("mtp.") for n in record["tensors"])
    source, written = (json.loads((d / "config.json").read_text()) for d in (hf, tmp_path / "exported"))
    assert {k: written[k] for k in source} == source


def test_vision_variant_text_weights_import_and_other_parts_are_carried(tmp_path, capsys):
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, seed=2, quantised=True, fp8_block=SMALL_BLOCK, max_shard_bytes=SHARD_BYTES)
    _prefixed(hf, "model.")
    g = torch.Generator().manual_seed(1)
    parts = {"vision.blocks.0.attn.qkv.weight": torch.randn(48, 16, generator=g).bfloat16(),
             "aligner.proj.weight": torch.randn(64, 16, generator=g).bfloat16(),
             "model.vision_tower.patch_embed.weight": torch.randn(16, 12, generator=g).bfloat16()}
    _add_tensors(hf, parts, {"vision_config": {"hidden_size": 16}, "aligner_config": {"depth": 1}})
    imported, _ = _round_trip(hf, tmp_path, capsys)
    assert "official-model-prefix naming" in imported and "carried 3 tensors" in imported
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["vision_config"] == {"hidden_size": 16}


def test_plain_release_with_a_draft_head_tensor_is_refused(tmp_path, capsys):
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, seed=4, max_shard_bytes=SHARD_BYTES)
    _add_tensors(hf, {"mtp.0.main_proj.weight": torch.zeros(64, 128)}, {})
    assert cli(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--quiet"]) != 0
    assert "'mtp.0.main_proj.weight' is not a DeepSeek-V4 tensor name" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32,
                       "beta_slow": 1, "mscale_all_dim": 0.7}}, "'mscale_all_dim' in rope_scaling"),
    ({"n_group": 4}, "n_group=4"),
])
def test_unknown_nested_or_active_legacy_key_is_refused_in_one_line_leaving_nothing(tmp_path, capsys, change,
                                                                                      named):
    hf = tmp_path / "hf"
    make_tiny_checkpoint(hf, seed=1)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **change}))
    assert cli(["import", "--hf", str(hf), "--out", str(tmp_path / "out"), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["hf"]

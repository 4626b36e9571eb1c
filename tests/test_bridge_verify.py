"""`python -m bridge verify` layer by layer: it names a tensor import decoded wrongly, and its memory
stays near one layer's on a checkpoint far larger than that.

The wrong decodings are the kind a bug in `bridge.quantisation` would make (FP4 nibbles in the other
order, an FP8 scale one exponent off); verify's reference decodes the release formats with its own
code (`bridge.reference_decoding`), so only the import side goes wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bridge import convert
from bridge.cli import main as cli
from bridge.hf_source import HFSource
from bridge.quantisation import E8M0, FP4, dequantise
from bridge.tiny import make_tiny_checkpoint, tiny_config, write_release_like_checkpoint

WRONG_DECODINGS = {
    # id: (official tensor, the failing part verify must name, the tensor group it must point to)
    "fp4-nibbles-swapped": (
        "layers.3.ffn.experts.1.w1.weight",
        "layer 3 moe",
        "layers.3.ffn.*",
    ),
    # (not wq_b, whose scale the per-head RMSNorm after it cancels: verify rightly passes that)
    "fp8-scale-doubled": (
        "layers.2.attn.wo_a.weight",
        "layer 2 attention",
        "layers.2.attn.*",
    ),
}


def _misdecoding(target: str):
    """`HFSource.read` that decodes `target` wrongly: FP4 with its nibbles swapped, FP8 with scales 2x."""
    read = HFSource.read

    def wrong(self, official, dequantised_dtype=torch.float32):
        if official != target:
            return read(self, official, dequantised_dtype)
        stored = self.tensors[official]
        weight, scale = (
            self.checkpoint.get(stored.name),
            self.checkpoint.get(stored.scale),
        )
        if stored.format.quant == FP4:
            nibbles = weight.view(torch.uint8)
            weight = ((nibbles << 4) | (nibbles >> 4)).view(torch.int8)
        else:
            assert scale.dtype == E8M0
            scale = (scale.view(torch.uint8) + 1).view(E8M0)
        return dequantise(weight, scale, stored.format, dequantised_dtype), scale

    return wrong


@pytest.mark.parametrize("case", list(WRONG_DECODINGS))
def test_verify_names_a_tensor_import_decoded_wrongly(
    tmp_path, monkeypatch, capsys, case
):
    target, part, group = WRONG_DECODINGS[case]
    hf, good, bad = tmp_path / "hf", tmp_path / "good", tmp_path / "bad"
    make_tiny_checkpoint(hf, seed=2, quantised=True)
    convert.import_checkpoint(hf, good, torch.bfloat16, progress=False)
    with monkeypatch.context() as patched:
        patched.setattr(HFSource, "read", _misdecoding(target))
        convert.import_checkpoint(hf, bad, torch.bfloat16, progress=False)
    verify = [
        "verify",
        "--hf",
        str(hf),
        "--sequences",
        "2",
        "--seq-len",
        "40",
        "--quiet",
    ]
    assert cli([*verify, "--mcore", str(good)]) == 0
    capsys.readouterr()
    assert cli([*verify, "--mcore", str(bad)]) == 3
    out, err = capsys.readouterr()
    assert "MISMATCH" in out
    assert err.startswith(f"error: {part} differs") and group in err, err
    # the layers before it pass: the difference is located, not smeared over the model
    layer = int(part.split()[1])
    assert (
        cli(
            [*verify, "--mcore", str(bad), "--layers", ",".join(map(str, range(layer)))]
        )
        == 0
    )


# A checkpoint of 0.49 GB in the release formats whose routed experts dominate: 4 layers of 12 experts
# of 1024 x 5120 (FP4), so one layer is a quarter of the model.
LARGE = tiny_config(
    vocab_size=4096, hidden_size=1024, num_layers=4, num_attention_heads=8, head_dim=128, qk_rope_head_dim=64,
    q_lora_rank=256, o_groups=2, o_lora_rank=256, sliding_window=16, compress_ratios=(0, 4, 128, 4),
    index_n_heads=8, index_head_dim=64, index_topk=8, num_routed_experts=12, num_experts_per_tok=4,
    moe_intermediate_size=5120, num_hash_layers=1, num_nextn_predict_layers=0,
)  # fmt: skip
START_UP_ALLOWANCE = 300 << 20
"""Memory of the run beyond the libraries' start-up that is not the model's: activations, the lookup tables,
the Megatron-Core checkpoint's metadata and its read groups (`convert.READ_GROUP_BYTES`)."""
PEAK_CHILD = """
import json, sys
import bridge.verify  # the libraries' start-up: torch, Megatron-Core, transformers
from bridge.cli import main
from megatron_v4.runtime.memory import peak_resident_bytes

start_up = peak_resident_bytes()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "start_up": start_up, "peak": peak_resident_bytes()}))
"""


def test_verify_memory_stays_near_one_layer(tmp_path):
    hf, mcore = tmp_path / "hf", tmp_path / "mcore"
    write_release_like_checkpoint(hf, LARGE, max_shard_bytes=256 << 20)
    convert.import_checkpoint(hf, mcore, torch.bfloat16, progress=False)
    source = HFSource(hf)
    numel = {
        name: torch.Size(stored.shape).numel()
        for name, stored in source.tensors.items()
    }
    total = sum(numel.values())
    layer = max(
        sum(n for name, n in numel.items() if name.startswith(f"layers.{i}."))
        for i in range(4)
    )
    ends = max(numel["embed.weight"], numel["head.weight"])
    disk = sum(f.stat().st_size for f in hf.iterdir())
    assert 0.4e9 < disk < 0.5e9 and layer > total / 5

    done = subprocess.run(
        check=False,
        args=[
            sys.executable,
            "-c",
            PEAK_CHILD,
            "verify",
            "--hf",
            str(hf),
            "--mcore",
            str(mcore),
            "--sequences",
            "2",
            "--seq-len",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    # One side's layer at a time, in fp32 (4 B a parameter), while the reference's decoded tensors (FP4 in
    # bf16, exact) are stacked into transformers' expert tensors (per-expert copies, then the stack) and
    # freed memory the allocator has not yet returned: 5 fp32 copies of a layer (4.3 measured).
    bound = result["start_up"] + START_UP_ALLOWANCE + 5 * 4 * layer + 4 * ends
    used = result["peak"] - result["start_up"]
    print(
        f"verify of {total / 1e6:.0f}M parameters ({disk / 1e9:.2f} GB): peak RSS {result['peak'] / 1e9:.2f} GB "
        f"({used / total:.2f} B/parameter above the {result['start_up'] / 1e9:.2f} GB start-up); bound "
        f"{bound / 1e9:.2f} GB"
    )
    assert result["peak"] <= bound
    assert (
        used < 12 * total / 2
    )  # the whole-model verify took 12 B/parameter, and more with more layers

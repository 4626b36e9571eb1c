"""The loop a user walks: Hugging Face -> import -> train -> save -> export -> transformers / generate.

At one rank and at TP2 x EP2, in bf16 as on GPU:
- `pretrain.py --load IMPORT --save DIR` writes checkpoints that `bridge export` reads (the latest
  iteration of DIR, or a chosen one), and the exported safetensors hold the trained bf16 weights byte
  for byte (read back from the training checkpoint with torch's own DCP reader);
- transformers' `DeepseekV4ForCausalLM.from_pretrained` loads the export, and its fp32 logits equal
  Megatron-Core's on the training checkpoint;
- `examples/generate.py --mcore DIR` decodes from the training checkpoint;
- a run from random init (`--arch`) reaches Hugging Face the same way.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import DeepseekV4ForCausalLM

from bridge.cli import main as bridge_cli
from bridge.safetensors_io import SafetensorsCheckpoint
from megatron_v4.runtime.ranks import run_on_ranks
from pretrain_runs import imported_tiny, train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import generate as generate_example  # noqa: E402

pytestmark = pytest.mark.timeout(600)

TRAIN = ["--train-iters", "3", "--warmup-iters", "1", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "1e-2", "--dtype", "bf16", "--save-interval", "2"]



def ours_logits(save_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    import megatron_v4
    from bridge.convert import load_megatron_model

    megatron_v4.initialize()
    try:
        model = load_megatron_model(save_dir, dtype=torch.float32)
        return megatron_v4.forward_logits([model], input_ids)
    finally:
        megatron_v4.destroy()


def generate_tokens(argv: list[str]) -> list[int]:
    return generate_example.main(argv)["tokens"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> str:
    return imported_tiny(tmp_path_factory.mktemp("source"), torch.bfloat16)


def _trained_bf16_tensors(iteration_dir: str, tmp_path) -> dict[str, torch.Tensor]:
    """The model tensors of a training checkpoint, read with torch's DCP reader (not the bridge's)."""
    target = tmp_path / "trained.pt"
    dcp_to_torch_save(iteration_dir, target)
    state = torch.load(target, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16}


def _check_export_holds_the_trained_weights(save: str, exported: str, tmp_path) -> None:
    from bridge.pipeline import mcore_state_dict_from_hf

    files = SafetensorsCheckpoint(exported)
    official = {name: files.get(name) for name in files.names()}
    # The export back in Megatron-Core names (w1/w3 fused as linear_fc1), to compare with the checkpoint.
    as_mcore = dict(mcore_state_dict_from_hf(official))
    trained = _trained_bf16_tensors(os.path.join(save, "iter_0000003"), tmp_path)
    assert trained, "no bf16 model tensor in the training checkpoint"
    # Megatron-Core checkpoints sequential experts stacked: `mlp.experts.experts.X` is [experts, ...].
    per_expert = {}
    for name, tensor in trained.items():
        if ".mlp.experts.experts." in name:
            for e, part in enumerate(tensor):
                per_expert[name.replace(".experts.experts.", f".experts.local_experts.{e}.")] = part
        else:
            per_expert[name] = tensor
    trained = per_expert
    for name, tensor in trained.items():
        assert name in as_mcore, f"{name} missing from the export"
        exported_tensor = as_mcore[name].reshape(tensor.shape)
        # bf16 sources come back as bf16; fp32 sources (the tiny checkpoint's) keep fp32, holding the
        # bf16 values exactly.
        as_bf16 = exported_tensor.to(torch.bfloat16)
        assert torch.equal(as_bf16.to(exported_tensor.dtype), exported_tensor), f"{name}: not bf16 values"
        assert torch.equal(as_bf16.view(torch.int16), tensor.view(torch.int16)), f"{name} changed bytes"
    print(f"{len(trained)} trained bf16 tensors byte-identical in the export")


def _check_transformers_logits(save: str, exported: str) -> None:
    hf = DeepseekV4ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    input_ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=input_ids).logits
    (got,) = run_on_ranks(ours_logits, 1, save, input_ids, timeout=120)
    diff = (got - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"transformers on the export vs Megatron-Core on the training checkpoint: max |diff| {diff:.2e} "
          f"(max |logit| {scale:.2f})")
    assert diff <= 1e-5 * scale


@pytest.mark.parametrize("layout, world", [([], 1), (["--tp", "2", "--ep", "2"], 2)], ids=["one-rank", "tp2xep2"])
def test_import_train_export_loads_in_transformers(imported, tmp_path, layout, world):
    save = str(tmp_path / "run")
    history = run_on_ranks(train, world, TRAIN + ["--load", imported, "--save", save] + layout, timeout=300)[0]
    assert [m["step"] for m in history] == [1, 2, 3]
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000003", "latest_checkpointed_iteration.txt"]

    exported = str(tmp_path / "hf")
    assert bridge_cli(["export", "--mcore", save, "--out", exported, "--dtype", "bf16", "--quiet"]) == 0
    _check_export_holds_the_trained_weights(save, exported, tmp_path)
    _check_transformers_logits(save, exported)

    # An earlier iteration by number, re-quantised to the source's FP8/FP4 formats.
    earlier = str(tmp_path / "hf-iter2")
    assert bridge_cli(["export", "--mcore", save, "--iteration", "2", "--out", earlier, "--quiet"]) == 0
    assert DeepseekV4ForCausalLM.from_pretrained(earlier, dtype=torch.float32) is not None

    tokens = run_on_ranks(generate_tokens, world, ["--mcore", save, "--prompt-ids", "5,6,7,8", "--greedy",
                                                   "--max-new-tokens", "3", *layout[:2]], timeout=120)
    assert all(len(t) == 3 and t == tokens[0] for t in tokens)


def test_random_init_run_reaches_hugging_face(tmp_path):
    from bridge.hf_config import write_official_config
    from bridge.tiny import TINY

    write_official_config(TINY, tmp_path / "arch")
    save = str(tmp_path / "run")
    run_on_ranks(train, 1, TRAIN + ["--arch", str(tmp_path / "arch" / "config.json"), "--save", save], timeout=300)
    exported = str(tmp_path / "hf")
    assert bridge_cli(["export", "--mcore", save, "--out", exported, "--quiet"]) == 0
    _check_export_holds_the_trained_weights(save, exported, tmp_path)
    _check_transformers_logits(save, exported)

"""examples/pretrain.py on CPU (gloo ranks, fp32).

Every run starts from the same weights: a tiny random Hugging Face checkpoint converted to `torch_dist`
with the bridge, which each layout loads resharded (`--load`). Checked:
- 20 steps at EP=2, PP=2, TP=2 (with sequence parallelism) and CP=2 give the losses and gradient norms of one
  rank (fp32, 1e-4 relative), MTP loss included;
- the aux-loss-free expert biases move by whole multiples of the update rate (finalize_model_grads);
- a run stopped at step 10 and resumed from its checkpoint gives the uninterrupted run's remaining
  losses, MTP losses, gradient norms and learning rates exactly (model, Adam state, LR schedule, expert
  biases, data position); the same in bf16 and at EP=2 (optimizer state sharded over 2 DP ranks);
- loss decreases on a small repetitive corpus: JSONL with the byte tokenizer, text with a Hugging Face
  tokenizer made here with the `tokenizers` library.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrain_runs import imported_tiny, launch

pytestmark = pytest.mark.timeout(600)

STEPS = 20
COMMON = ["--train-iters", str(STEPS), "--warmup-iters", "3", "--seq-length", "32",
          "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3"]






@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return imported_tiny(tmp_path_factory.mktemp("tiny"), torch.float32)


@pytest.fixture(scope="module")
def one_rank(converted, tmp_path_factory) -> list[dict]:
    """The reference run on one rank; it saves checkpoints at steps 10 and 20."""
    save = tmp_path_factory.mktemp("one_rank")
    history = launch(1, COMMON + ["--load", converted, "--save", str(save), "--save-interval", "10"])
    return {"history": history, "save": str(save)}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["--ep", "2"], id="ep2"),
        pytest.param(["--pp", "2"], id="pp2"),
        pytest.param(["--tp", "2", "--sp"], id="tp2-sp"),
        pytest.param(["--cp", "2"], id="cp2"),
    ],
)
def test_layout_matches_one_rank(converted, one_rank, layout):
    expected = one_rank["history"]
    parallel = launch(2, COMMON + ["--load", converted] + layout)
    assert len(parallel) == STEPS
    loss_worst = max(_relative(p["loss"], e["loss"]) for p, e in zip(parallel, expected))
    grad_worst = max(_relative(p["grad_norm"], e["grad_norm"]) for p, e in zip(parallel, expected))
    print(
        f"{' '.join(layout)}: loss {expected[0]['loss']:.4f} -> {expected[-1]['loss']:.4f}; worst relative "
        f"difference to one rank: loss {loss_worst:.2e}, grad norm {grad_worst:.2e}"
    )
    assert loss_worst <= 1e-4
    assert grad_worst <= 1e-4


def test_checkpoint_saved_at_cp2_resumes_at_one_rank(converted, one_rank, tmp_path):
    """Checkpoints do not depend on the context-parallel size: a run stopped at step 10 at CP=2 and resumed
    on one rank continues as the one-rank run does (model, Adam state, schedule, data position)."""
    launch(2, COMMON + ["--load", converted, "--cp", "2", "--save", str(tmp_path), "--exit-after", "10"])
    resumed = launch(1, COMMON + ["--load", str(tmp_path)])
    expected = one_rank["history"][10:]
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    loss_worst = max(_relative(r["loss"], e["loss"]) for r, e in zip(resumed, expected))
    grad_worst = max(_relative(r["grad_norm"], e["grad_norm"]) for r, e in zip(resumed, expected))
    print(f"resumed at one rank from CP=2: worst relative difference loss {loss_worst:.2e}, grad norm {grad_worst:.2e}")
    assert loss_worst <= 1e-4
    assert grad_worst <= 1e-4


def _tensors(checkpoint_dir: str, tmp_path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / (os.path.basename(checkpoint_dir) + ".pt")
    dcp_to_torch_save(checkpoint_dir, target)
    return torch.load(target, weights_only=False)


def test_expert_bias_updates(converted, one_rank, tmp_path):
    """Aux-loss-free balancing: after each step every learned router's bias moves by +-rate (or 0 when
    an expert gets exactly the mean load) towards balance, so after 10 steps (bias - initial) / rate is an
    integer in [-10, 10]; the hash routers have none."""
    rate = 1e-3
    initial = _tensors(converted, tmp_path)
    trained = _tensors(os.path.join(one_rank["save"], "iter_0000010"), tmp_path)
    biased = sorted(k for k in trained if k.endswith("router.expert_bias"))
    assert biased == [
        "decoder.layers.2.mlp.router.expert_bias",
        "decoder.layers.3.mlp.router.expert_bias",
        "mtp.layers.0.transformer_layer.mlp.router.expert_bias",
    ]
    for key in biased:
        steps = (trained[key].double() - initial[key].double()) / rate
        print(f"{key}: moved by {steps.tolist()} x rate")
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert 1 <= steps.round().abs().max() <= 10, f"{key} moved {steps.tolist()} x rate in 10 steps"


def test_resume_reproduces_the_remaining_steps(converted, one_rank):
    """Resume from the step-10 checkpoint of the uninterrupted reference run: bit-identical metrics."""
    save = one_rank["save"]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("10\n")
    resumed = launch(1, COMMON + ["--load", save])
    expected = one_rank["history"][10:]
    assert [m["step"] for m in resumed] == list(range(11, STEPS + 1))
    for key in ("loss", "mtp_loss", "grad_norm", "lr"):
        assert [m[key] for m in resumed] == [m[key] for m in expected], key


@pytest.mark.parametrize(
    "world, layout",
    [
        # bf16 model (Float16Module), fp32 main parameters in the distributed optimizer, as on GPU
        pytest.param(1, ["--dtype", "bf16"], id="bf16"),
        # optimizer state sharded over 2 data-parallel ranks, experts over 2 expert-parallel ranks
        pytest.param(2, ["--ep", "2"], id="ep2"),
    ],
)
def test_resume_from_random_init(tmp_path, world, layout):
    """6 steps straight, and 3 + 3 through a checkpoint, from random initialisation and mock data."""
    args = layout + ["--train-iters", "6", "--warmup-iters", "1", "--seq-length", "32"]
    straight = launch(world, args)
    launch(world, args + ["--save", str(tmp_path), "--exit-after", "3"])
    resumed = launch(world, args + ["--load", str(tmp_path)])
    assert resumed == straight[3:]
    assert straight[-1]["loss"] < straight[0]["loss"]


CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "a stitch in time saves nine.",
    "all that glitters is not gold.",
]


def _learns(history: list[dict]) -> tuple[float, float]:
    first = sum(m["loss"] for m in history[:3]) / 3
    last = sum(m["loss"] for m in history[-3:]) / 3
    return first, last


def test_loss_decreases_on_repetitive_jsonl_with_byte_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": CORPUS[i % 3]}) + "\n" for i in range(60)))
    arch = tmp_path / "arch.json"
    _write_arch(arch, vocab_size=320)  # bytes + end of document fit
    history = launch(1, COMMON + ["--arch", str(arch), "--text-file", str(corpus), "--data-cache", str(tmp_path)])
    first, last = _learns(history)
    print(f"byte tokenizer: loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first


def test_loss_decreases_on_text_with_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp_path / "tokenizer"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS[i % 3] for i in range(90)))
    history = launch(
        1,
        COMMON
        + ["--text-file", str(corpus), "--tokenizer", str(tmp_path / "tokenizer"), "--data-cache", str(tmp_path)],
    )
    first, last = _learns(history)
    print(f"word-level HF tokenizer: loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first


def _write_arch(path, **changes) -> None:
    from bridge.hf_config import official_config_dict
    from bridge.tiny import tiny_config

    path.write_text(json.dumps(official_config_dict(tiny_config(**changes))))

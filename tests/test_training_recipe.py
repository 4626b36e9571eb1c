"""Training DeepSeek-V4 as it was trained: Muon, finetuning, freezing, validation and metric files
(examples/pretrain.py on gloo ranks, fp32).

Checked:
- one Muon step (and a second, through the momentum) of Megatron-Core's optimizer, as `pretrain` builds
  it, equals a Newton-Schulz reference written here for a Muon matrix, a SwiGLU fc1 (w1 and w3
  orthogonalised apart), and AdamW for tensors DeepSeek-V4 keeps out of Muon (mHC `fn`, a norm); both
  update scale modes; the Muon / AdamW split itself;
- with --optimizer muon, TP=2 (+SP), EP=2 and PP=2 (and dist_muon at EP=2) give one rank's losses and
  gradient norms over 5 steps (1e-5 relative); resuming a Muon run from its checkpoint reproduces the
  remaining steps exactly;
- --freeze at EP=2: frozen tensors bit-identical after 10 steps, trainable ones changed, frozen ones with
  no gradient buffer and no optimizer state; --freeze-file with official names (fused fc1 only with both
  w1 and w3); unknown names and patterns that match nothing are errors; parameter counts agree over
  layouts;
- --load --finetune: weights carried over, step count, LR schedule and optimizer new (switching optimizer);
- --eval-interval: validation losses (mock and a held-out --split of text data), which leave training
  unchanged; --metrics-jsonl and --tensorboard-dir written with their fields.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from megatron_v4.runtime.ranks import run_on_ranks
from pretrain_runs import LOGGED, imported_tiny, launch, train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import pretrain  # noqa: E402

pytestmark = pytest.mark.timeout(600)

STEPS = 5
COMMON = ["--train-iters", str(STEPS), "--warmup-iters", "1", "--seq-length", "32",
          "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3"]
MUON = ["--optimizer", "muon"]




@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return imported_tiny(tmp_path_factory.mktemp("tiny"), torch.float32)


@pytest.fixture(scope="module")
def muon_one_rank(converted, tmp_path_factory) -> dict:
    """The one-rank Muon reference run; checkpoints at steps 3 and 5."""
    save = tmp_path_factory.mktemp("muon_one_rank")
    history = launch(1, COMMON + MUON + ["--load", converted, "--save", str(save), "--save-interval", "3"])
    return {"history": history, "save": str(save)}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------------- Muon step
A, B, C = 3.4445, -4.7750, 2.0315


def newton_schulz5(g: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's Muon reference: five quintic iterations on G / ||G||_F (on the wide orientation)."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(5):
        a = x @ x.T
        x = A * x + (B * a + C * a @ a) @ x
    return x.T if tall else x


def muon_reference(weight, grads, lr, mu, scale_mode, halves=False):
    """W after Muon steps: B = mu B + G; O = NS5(B) (each SwiGLU half apart); W -= lr * scale * O."""
    def orthogonalise(b):
        if not halves:
            return newton_schulz5(b)
        top, bottom = b.chunk(2, dim=0)
        return torch.cat([newton_schulz5(top), newton_schulz5(bottom)])

    w, momentum = weight.double().clone(), torch.zeros_like(weight, dtype=torch.float64)
    for g in grads:
        momentum = mu * momentum + g.double()
        rows, cols = (w.shape[0] // 2, w.shape[1]) if halves else w.shape
        scale = max(rows, cols) ** 0.5 if scale_mode == "spectral" else (rows / cols) ** 0.5
        w = w - lr * scale * orthogonalise(momentum)
    return w


def adamw_reference(weight, grads, lr, beta1, beta2, eps):
    w = weight.double().clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
    return w


CHECKED = {
    "decoder.layers.2.self_attention.linear_q_down_proj.weight": "muon",
    "decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight": "muon-glu",
    "decoder.layers.2.mlp.router.weight": "muon",
    "decoder.layers.2.hc_attn.fn": "adamw",
    "decoder.layers.2.self_attention.compressor.ape": "adamw",
    "decoder.final_layernorm.weight": "adamw",
}


def _optimizer_steps(argv: list[str]) -> dict:
    """Rank entry point: the model and optimizer as `pretrain` builds them; two optimizer steps on fixed
    random gradients. Returns the checked tensors before/after, their gradients, and the Muon set."""
    from megatron_v4.runtime.parallel import destroy, initialize
    from megatron_v4.training.launch import architecture, build_bare, model_config
    from megatron_v4.training.model_setup import build_model
    from megatron_v4.training.optimizer import build_optimizer, muon_managed, optimizer_config, uses_distributed_adam

    args = pretrain.parse_args(argv)
    layout = initialize(tp=1, pp=1, ep=1, etp=1, sp=False, seed=args.seed)
    try:
        config = model_config(args, architecture(args)[0], layout)
        model, bare = build_model(config, uses_distributed_adam(args.optimizer), bare=build_bare(args, config))
        optimizer = build_optimizer(model, optimizer_config(args, config.params_dtype))
        params = dict(bare.named_parameters())
        before = {n: params[n].detach().clone() for n in CHECKED}
        generator = torch.Generator().manual_seed(7)
        grads = {n: [] for n in CHECKED}
        for _ in range(2):
            for name, param in params.items():
                g = torch.randn(param.shape, generator=generator)
                param.main_grad.copy_(g)
                if name in grads:
                    grads[name].append(g)
            for group in optimizer.param_groups:
                group["lr"] = args.lr
                group["weight_decay"] = 0.0
            optimizer.step()
        managed = {id(p) for p in muon_managed(optimizer)}
        return {
            "before": before,
            "after": {n: params[n].detach().clone() for n in CHECKED},
            "grads": grads,
            "muon": sorted(n for n, p in params.items() if id(p) in managed),
            "all": sorted(params),
        }
    finally:
        destroy()


@pytest.mark.parametrize("scale_mode", ["spectral", "unit_rms_norm"])
def test_muon_step_matches_newton_schulz_reference(scale_mode):
    lr, mu = 1e-2, 0.9
    argv = ["--optimizer", "muon", "--lr", str(lr), "--muon-momentum", str(mu), "--muon-scale-mode", scale_mode,
            "--clip-grad", "0", "--weight-decay", "0", "--adam-beta1", "0.8", "--adam-beta2", "0.9",
            "--adam-eps", "1e-8"]
    out = run_on_ranks(_optimizer_steps, 1, argv, timeout=300)[0]

    for name, kind in CHECKED.items():
        assert (name in out["muon"]) == kind.startswith("muon"), name
        w0, grads, w2 = out["before"][name], out["grads"][name], out["after"][name]
        if kind.startswith("muon"):
            expected = muon_reference(w0, grads, lr, mu, scale_mode, halves=kind == "muon-glu")
        else:
            expected = adamw_reference(w0, grads, lr, 0.8, 0.9, 1e-8)
        error = ((w2.double() - expected).norm() / (expected - w0.double()).norm()).item()
        print(f"{scale_mode} {name} ({kind}): |W - reference| / |update| = {error:.2e}")
        assert error < 1e-5, name


def test_muon_split_follows_deepseek_v4():
    """Every 2-D `.weight` of a linear layer is Muon's; embedding, head, norms, mHC and specials are not."""
    out = run_on_ranks(_optimizer_steps, 1, ["--optimizer", "muon", "--clip-grad", "0"], timeout=300)[0]
    muon, everything = set(out["muon"]), set(out["all"])
    adamw = everything - muon
    print(f"Muon: {len(muon)} tensors; AdamW: {len(adamw)} tensors")
    assert all(n.endswith(".weight") and "norm" not in n for n in muon)
    for part in (".fn", ".base", ".scale", "attn_sink", ".ape", "layernorm", "enorm", "hnorm", "norm.weight",
                 "embedding", "output_layer"):
        assert not [n for n in muon if n.endswith(part) or part in n.split(".")[-2:]], part
    for suffix in ("linear_q_down_proj.weight", "linear_q_up_proj.weight", "linear_kv.weight", "linear_proj.weight",
                   "linear_o_down_proj.weight", "router.weight", "linear_fc1.weight", "linear_fc2.weight",
                   "e_proj.weight", "h_proj.weight", "compressor.linear_gate.weight",
                   "indexer.linear_weights_proj.weight"):
        assert [n for n in muon if n.endswith(suffix)], suffix


# ------------------------------------------------------------------------------------ layouts, resume
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["--tp", "2", "--sp"] + MUON, id="muon-tp2-sp"),
        pytest.param(["--ep", "2"] + MUON, id="muon-ep2"),
        pytest.param(["--pp", "2"] + MUON, id="muon-pp2"),
        pytest.param(["--ep", "2", "--optimizer", "dist_muon"], id="dist_muon-ep2"),
    ],
)
def test_muon_layout_matches_one_rank(converted, muon_one_rank, layout):
    expected = muon_one_rank["history"]
    parallel = launch(2, COMMON + ["--load", converted] + layout)
    assert len(parallel) == STEPS
    loss_worst = max(_relative(p["loss"], e["loss"]) for p, e in zip(parallel, expected))
    mtp_worst = max(_relative(p["mtp_loss"], e["mtp_loss"]) for p, e in zip(parallel, expected))
    grad_worst = max(_relative(p["grad_norm"], e["grad_norm"]) for p, e in zip(parallel, expected))
    print(
        f"{' '.join(layout)}: loss {expected[0]['loss']:.4f} -> {expected[-1]['loss']:.4f}; worst relative "
        f"difference to one rank: loss {loss_worst:.2e}, mtp loss {mtp_worst:.2e}, grad norm {grad_worst:.2e}"
    )
    assert loss_worst <= 1e-5 and mtp_worst <= 1e-5 and grad_worst <= 1e-5


def test_muon_resume_reproduces_the_remaining_steps(muon_one_rank):
    save = muon_one_rank["save"]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3\n")
    try:
        resumed = launch(1, COMMON + MUON + ["--load", save])
    finally:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{STEPS}\n")
    assert [m["step"] for m in resumed] == [4, 5]
    assert resumed == muon_one_rank["history"][3:]


# ---------------------------------------------------------------------------------------------- freeze
FROZEN = ["decoder.layers.*.mlp.experts.*", r"decoder\.layers\.0\.self_attention\..*"]


def _tensors(checkpoint_dir: str, tmp_path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / (os.path.basename(checkpoint_dir) + ".pt")
    dcp_to_torch_save(checkpoint_dir, target)
    return torch.load(target, weights_only=False)


def test_freeze_keeps_tensors_bit_identical_at_ep2(converted, tmp_path):
    argv = ["--train-iters", "10", "--warmup-iters", "1", "--seq-length", "32", "--ep", "2",
            "--load", converted, "--save", str(tmp_path / "run"), "--freeze", *FROZEN]
    history = launch(2, argv)
    assert history[-1]["loss"] < history[0]["loss"]
    initial = _tensors(converted, tmp_path)
    trained = _tensors(str(tmp_path / "run" / "iter_0000010"), tmp_path)
    frozen = [k for k in initial if k.startswith("decoder.layers.0.self_attention.")
              or (k.startswith("decoder.layers.") and ".mlp.experts." in k)]
    frozen = [k for k in frozen if isinstance(initial[k], torch.Tensor) and "_extra_state" not in k
              and "rotary" not in k]
    trainable = ["decoder.layers.1.self_attention.linear_q_down_proj.weight", "output_layer.weight",
                 "decoder.layers.2.mlp.shared_experts.linear_fc1.weight", "decoder.layers.0.hc_attn.fn"]
    assert len(frozen) >= 10, frozen
    for key in frozen:
        assert torch.equal(trained[key], initial[key]), key
    for key in trainable:
        assert not torch.equal(trained[key], initial[key]), key
    print(f"frozen: {len(frozen)} tensors unchanged after 10 steps at EP=2; trainable ones moved")


def _frozen_state(argv: list[str]) -> dict:
    """Rank entry point: freeze, build DDP and the optimizer, take one step; which parameters have gradient
    buffers and optimizer state, and the parameter counts."""
    from megatron.core import parallel_state

    from megatron_v4.runtime.parallel import destroy, initialize
    from megatron_v4.training.freezing import global_names, parameter_counts
    from megatron_v4.training.launch import architecture, build_bare, model_config
    from megatron_v4.training.model_setup import build_model
    from megatron_v4.training.optimizer import build_optimizer, optimizer_config, uses_distributed_adam

    args = pretrain.parse_args(argv)
    layout = initialize(tp=args.tp, pp=args.pp, ep=args.ep, etp=1, sp=args.tp > 1, seed=args.seed)
    try:
        config = model_config(args, architecture(args)[0], layout)
        bare = build_bare(args, config)
        model, bare = build_model(config, uses_distributed_adam(args.optimizer), bare=bare)
        optimizer = build_optimizer(model, optimizer_config(args, config.params_dtype))
        for param in bare.parameters():
            if param.requires_grad:
                param.main_grad.normal_()
        optimizer.step()
        names = global_names(bare)
        in_buffers = {id(p) for buffer in model.buffers + model.expert_parallel_buffers for p in buffer.params}
        with_state = set()
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            torch_optimizer = getattr(inner, "optimizer", inner)
            with_state |= {id(p) for p in torch_optimizer.state}
        return {
            "frozen": sorted(n for n, p in names.items() if not p.requires_grad),
            "frozen_with_grad_buffer": sorted(n for n, p in names.items() if not p.requires_grad and id(p) in in_buffers),
            "frozen_with_state": sorted(n for n, p in names.items() if not p.requires_grad and id(p) in with_state),
            "trainable_with_state": sum(id(p) in with_state for p in names.values() if p.requires_grad),
            "counts": parameter_counts(bare),
            "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        }
    finally:
        destroy()


def test_frozen_tensors_have_no_gradient_buffer_or_optimizer_state(converted):
    argv = ["--load", converted, "--ep", "2", "--optimizer", "muon", "--freeze", *FROZEN]
    results = run_on_ranks(_frozen_state, 2, argv, timeout=300)
    for result in results:
        assert result["frozen"] and not result["frozen_with_grad_buffer"] and not result["frozen_with_state"]
        assert result["trainable_with_state"] > 0
    # each expert-parallel rank freezes its own experts, under their global numbers
    experts = [sorted({n.split("local_experts.")[1].split(".")[0] for n in r["frozen"] if "local_experts" in n})
               for r in results]
    assert experts == [["0", "1"], ["2", "3"]], experts


def test_parameter_counts_agree_over_layouts(converted):
    counts = {}
    for world, layout in ((1, []), (2, ["--ep", "2"]), (2, ["--tp", "2"]), (2, ["--pp", "2"])):
        argv = ["--load", converted, "--freeze", *FROZEN] + layout
        results = run_on_ranks(_frozen_state, world, argv, timeout=300)
        counts[" ".join(layout) or "one rank"] = results[0]["counts"]
    print(counts)
    one = counts["one rank"]
    assert one["frozen"] > 0 and one["trainable"] > 0 and one["trainable"] + one["frozen"] == one["total"]
    assert all(c == one for c in counts.values())


def _freeze_names(freeze_file: str) -> list[str]:
    from megatron_v4.runtime.parallel import destroy, initialize
    from megatron_v4.training.freezing import freeze, read_freeze_file
    from megatron_v4.training.launch import architecture, model_config
    from megatron_v4.training.model_setup import bare_model

    args = pretrain.parse_args([])
    layout = initialize(tp=1, pp=1, ep=1, etp=1, sp=False, seed=1)
    try:
        bare = bare_model(model_config(args, architecture(args)[0], layout))
        return sorted(freeze(bare, [], read_freeze_file(freeze_file)))
    finally:
        destroy()


def test_freeze_file_with_official_names(tmp_path):
    listed = tmp_path / "frozen_keys.json"
    listed.write_text(json.dumps(["embed.weight", "layers.0.attn.wq_a.weight", "layers.2.ffn.experts.1.w1.weight",
                                  "layers.2.ffn.gate.bias", "mtp.0.e_proj.weight"]))
    frozen = run_on_ranks(_freeze_names, 1, str(listed), timeout=300)[0]
    # the fused fc1 (w1 + w3) stays trainable while only w1 is listed; the gate bias is a buffer
    assert frozen == ["decoder.layers.0.self_attention.linear_q_down_proj.weight",
                      "embedding.word_embeddings.weight", "mtp.layers.0.e_proj.weight"]
    listed.write_text(json.dumps(["layers.2.ffn.experts.1.w1.weight", "layers.2.ffn.experts.1.w3.weight"]))
    frozen = run_on_ranks(_freeze_names, 1, str(listed), timeout=300)[0]
    assert frozen == ["decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--freeze", "decoder.layers.*.no_such_thing"], "matches no parameter"),
        (["--freeze-file", "FILE"], "does not have"),
    ],
)
def test_freeze_mistakes_are_one_line_errors(tmp_path, flags, message):
    from megatron_v4.runtime.ranks import RankFailure

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["layers.0.attn.no_such.weight"]))
    flags = [str(bad) if f == "FILE" else f for f in flags]
    with pytest.raises(RankFailure, match=message):
        launch(1, ["--train-iters", "2", "--warmup-iters", "0"] + flags)


# -------------------------------------------------------------------------------------------- finetune
def test_finetune_resets_step_optimizer_and_schedule(converted, muon_one_rank):
    """Weights from the Muon run's final checkpoint; a new AdamW, a new schedule, counting from step 1."""
    fresh = launch(1, COMMON + ["--load", converted, "--train-iters", "3"])
    tuned = launch(1, COMMON + ["--load", muon_one_rank["save"], "--finetune", "--train-iters", "3"])
    assert [m["step"] for m in tuned] == [1, 2, 3]
    assert [m["lr"] for m in tuned] == [m["lr"] for m in fresh]
    trained_loss = muon_one_rank["history"][0]["loss"]
    print(f"finetune step-1 loss {tuned[0]['loss']:.4f} (from the converted weights: {fresh[0]['loss']:.4f})")
    assert tuned[0]["loss"] < fresh[0]["loss"] and fresh[0]["loss"] == pytest.approx(trained_loss, rel=1e-6)


# ---------------------------------------------------------------------------------- validation, metrics
def test_eval_metrics_jsonl_and_tensorboard(converted, muon_one_rank, tmp_path):
    jsonl, board = tmp_path / "metrics.jsonl", tmp_path / "tb"
    history = launch(1, COMMON + MUON + ["--load", converted, "--eval-interval", "2", "--eval-iters", "2",
                                         "--metrics-jsonl", str(jsonl), "--tensorboard-dir", str(board)])
    # evaluating leaves training as it was
    assert [{k: m[k] for k in LOGGED} for m in history] == muon_one_rank["history"]
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for record in steps:
        assert {"step", "loss", "mtp_loss", "indexer_loss", "grad_norm", "lr"} <= set(record)
        assert record["indexer_loss"] > 0 and record["loss"] > 0 and record["mtp_loss"] > 0
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(r["eval_loss"] > 0 and r["eval_mtp_loss"] > 0 and r["eval_indexer_loss"] > 0 for r in evals)
    print("eval:", [(r["step"], round(r["eval_loss"], 4), round(r["eval_mtp_loss"], 4),
                     round(r["eval_indexer_loss"], 4)) for r in evals])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mtp_loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "train/mem_gb",
            "train/indexer_loss", "eval/loss", "eval/mtp_loss", "eval/indexer_loss"} <= tags, tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m["loss"] for m in history])


def test_eval_on_held_out_split_of_text(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "abc " * (i % 7 + 3)}) + "\n"
                              for i in range(80)))
    arch = tmp_path / "arch.json"
    from bridge.hf_config import official_config_dict
    from bridge.tiny import tiny_config

    arch.write_text(json.dumps(official_config_dict(tiny_config(vocab_size=320))))
    argv = ["--train-iters", "3", "--warmup-iters", "1", "--seq-length", "32", "--arch", str(arch),
            "--text-file", str(corpus), "--data-cache", str(tmp_path), "--eval-interval", "3", "--eval-iters", "1"]
    with pytest.raises(Exception, match="needs a validation share"):
        pretrain.parse_args(argv)
    history = launch(1, argv + ["--split", "90,10,0"])
    assert history[-1]["eval"]["eval_loss"] > 0


# ------------------------------------------------------------------------------------------- phases
@pytest.mark.parametrize("phase", ["dense", "indexer-warmup", "sparse"])
def test_phase_trains_what_deepseek_trains(converted, tmp_path, phase):
    """dense: the indexer is not run (no loss, its weights unchanged); indexer-warmup: only the indexer
    moves, by the dense distillation loss; sparse: everything moves, the indexer by the sparse loss."""
    save = tmp_path / "run"
    (history,) = run_on_ranks(train, 1, ["--train-iters", "4", "--warmup-iters", "1", "--seq-length", "32",
                                         "--lr", "1e-2", "--load", converted, "--save", str(save),
                                         "--phase", phase], timeout=300)
    indexer_losses = [m["indexer_loss"] for m in history]
    print(f"{phase}: loss {[round(m['loss'], 4) for m in history]}, indexer loss {indexer_losses}")
    initial = _tensors(converted, tmp_path)
    trained = _tensors(str(save / "iter_0000004"), tmp_path)
    weights = [k for k in initial if isinstance(initial[k], torch.Tensor) and initial[k].is_floating_point()
               and "_extra_state" not in k and k in trained]
    indexer = [k for k in weights if ".indexer." in k]
    others = [k for k in weights if ".indexer." not in k and "expert_bias" not in k]
    assert len(indexer) >= 8 and len(others) > 50
    moved = {k for k in weights if not torch.equal(trained[k], initial[k])}
    if phase == "dense":
        assert indexer_losses == [None] * 4
        assert not moved & set(indexer) and set(others) & moved
    elif phase == "indexer-warmup":
        assert all(loss > 0 for loss in indexer_losses)
        assert set(indexer) <= moved and not moved & set(others), sorted(moved & set(others))[:3]
    else:
        assert all(loss > 0 for loss in indexer_losses)
        assert set(indexer) <= moved and set(others) & moved

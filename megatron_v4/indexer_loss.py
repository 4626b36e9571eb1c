"""Distillation loss of DeepSeek-V4's lightning indexer.

DeepSeek-V3.2 report, section 2.1 (V4 trains its CSA indexers the same way;
Megatron-LM calls the weight `dsa_indexer_loss_coeff`). Per CSA layer, for
query t and its candidate entries S_t (dense loss: every visible entry
w < (t + 1) // m; sparse loss: the indexer's top-k picks), in float32:

    teacher  p_t(w) = sum_h P_{t,h}(w) / sum_{w' in S_t} sum_h P_{t,h}(w')
    student  q_t(w) = softmax over w in S_t of I_{t,w},
             I_{t,w} = sum_h w_{t,h} ReLU(q^I_{t,h} . K^I_w)
    loss     = indexer_loss_coeff / (seq * batch) * sum over t with S_t non-empty of KL(p_t || q_t)

P_{t,h}(w) is the main attention's probability of entry w at head h, with the
layer's real softmax denominator (window keys + attended entries + sink); the
head sum covers all heads, over all tensor-parallel ranks. The teacher comes
from detached Q, kv and entries, the student from detached x and c_q: the loss
trains the indexer only, and the indexer learns from nothing else (its top-k
choice passes no gradient to the LM loss).

The loss reaches the backward through `IndexerLossAutoScaler` on the attention
output: Megatron-Core's device for auxiliary losses, whose backward feeds the
loss the main loss's backward scale / num_microbatches, which the schedules set
through `config.experimental_attention_variant_loss_scale_func`. Every pipeline
stage thus back-propagates its own layers' losses with an unchanged schedule.
The loss is computed only while autograd records (a training forward, or the
recomputation of a checkpointed layer), so activation recompute counts it once.
`IndexerLossTracker` keeps the step's values for logging.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.experimental_attention_variant.dsa import (
    DSAIndexerLossAutoScaler,
)

# Megatron-Core's scaler for its own (DSA) indexer loss: forward(output, loss) -> output; the backward
# gives `loss` the gradient set by `set_loss_scale`.
IndexerLossAutoScaler = DSAIndexerLossAutoScaler


def kl_to_teacher(teacher_mass: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """sum over queries with a candidate of KL(p || softmax(scores)) over their candidates.

    teacher_mass [..., n]: the attention's head-summed probabilities (0 off the candidates);
    scores [..., n]: the indexer's I; candidates [..., n] (bool).
    """
    has_candidates = candidates.any(dim=-1, keepdim=True)
    # Rows without candidates keep finite logits so that their (unused) softmax stays NaN-free.
    logits = scores.float().masked_fill(~candidates & has_candidates, float("-inf"))
    log_student = logits.log_softmax(dim=-1).masked_fill(~candidates, 0.0)
    teacher = teacher_mass / teacher_mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.xlogy(teacher, teacher) - teacher * log_student).sum()


class IndexerLossTracker:
    """The indexer losses of the current step, for logging (as Megatron-Core's MTPLossLoggingHelper).

    Each CSA layer `record`s its loss (coefficient included) once per micro-batch. After the
    step's forward/backward, every rank calls `step_mean(num_microbatches)`, then `reset()`.
    """

    sums: ClassVar[dict[int, torch.Tensor]] = {}  # layer number -> sum over micro-batches

    @classmethod
    def record(cls, layer_number: int, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        total = cls.sums.get(layer_number)
        cls.sums[layer_number] = loss if total is None else total + loss

    @classmethod
    def step_mean(cls, num_microbatches: int, pp_group=None, dp_group=None, cp_group=None) -> torch.Tensor:
        """Mean over CSA layers and micro-batches of the indexer loss, averaged over data-parallel ranks.

        Collective over `pp_group` (whose stages hold different layers), `cp_group` (whose ranks hold
        shares of every sequence's loss, summed) and `dp_group` (which see different data); defaults:
        Megatron-Core's. Tensor-parallel ranks hold equal values.
        """
        pp_group = pp_group or parallel_state.get_pipeline_model_parallel_group()
        dp_group = dp_group or parallel_state.get_data_parallel_group()
        cp_group = cp_group or parallel_state.get_context_parallel_group()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, layer count
        for loss in cls.sums.values():
            totals[0] += loss.double()
            totals[1] += 1
        dist.all_reduce(totals, group=pp_group)
        mean = totals[0] / totals[1].clamp_min(1) / num_microbatches
        dist.all_reduce(mean, group=cp_group)
        dist.all_reduce(mean, group=dp_group)
        return mean / dist.get_world_size(dp_group)

    @classmethod
    def reset(cls) -> None:
        cls.sums.clear()

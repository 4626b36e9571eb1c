"""Autoregressive generation with a DeepSeek-V4 model at any TP / EP / PP layout.

`generate(model, prompt_ids, max_new_tokens, sampling)` runs a prefill over the
prompt and then one forward per new token. With `use_cache=True` (default) the
model keeps its decode state in a `DeepSeekV4InferenceContext` (see
`megatron_v4.decode_state`), so a decode step only runs the new token; with
`use_cache=False` every step re-runs the whole sequence (the reference the
cache is checked against, and the baseline of the decode benchmark).

Every rank of the model-parallel group calls `generate` with the same prompt
and returns the same tokens:
- tensor parallelism: the vocabulary-parallel logits are gathered on every TP
  rank, which then all pick the same token (same logits, same seeded generator);
- expert parallelism: each rank routes its own copy of the tokens;
- pipeline parallelism: stage i receives the streams [s, b * hc_mult, hidden]
  from stage i-1 and sends its own on (point-to-point), the last stage picks
  the token and broadcasts it over the pipeline group.
Virtual (interleaved) pipeline stages are not supported: pass one model chunk.

Context parallelism: the decode state holds a layer's whole sequence, so `generate` runs at CP = 1.
`prefill(model, prompt_ids, sampling)` runs the prompt at any layout, context parallelism included
(`forward_logits`: each CP rank a contiguous chunk of the prompt), and picks the first new token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import get_attr_wrapped_model

from megatron_v4.inference.decode_context import DeepSeekV4InferenceContext
from megatron_v4.inference.evaluation import check_token_ids, evaluation_mode, forward_logits
from megatron_v4.model import pipeline_micro_batch_size


@dataclass
class SamplingParams:
    """greedy: argmax (the other fields are ignored). Otherwise softmax(logits / temperature)
    restricted to the `top_k` most likely tokens (0: all) and to the smallest set whose
    probability reaches `top_p`, drawn with a generator seeded with `seed`."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; use greedy decoding for temperature 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")


@dataclass
class GenerationResult:
    """tokens: the new ids [batch, new]; prefill_logits: float32 [batch, prompt, vocab] when kept."""

    tokens: torch.Tensor
    prefill_logits: torch.Tensor | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    step_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second over the decode steps (all sequences of the batch)."""
        if self.decode_steps == 0 or self.decode_seconds == 0:
            return float("nan")
        return self.decode_steps * self.tokens.shape[0] / self.decode_seconds


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits [batch, vocab] (float32) -> next token ids [batch]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth_best = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class _PipelineStage:
    """One forward of this rank's model chunk, passing the streams between pipeline stages."""

    def __init__(self, model):
        self.model = model
        self.config = get_attr_wrapped_model(model, "config")
        self.parallel_output = get_attr_wrapped_model(model, "parallel_output")
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage()
        self.last = ps.is_pipeline_last_stage()

    def logits(self, input_ids: torch.Tensor, context, position_ids=None) -> torch.Tensor | None:
        """Full-vocabulary float32 logits [batch, seq, vocab] on the last stage, None elsewhere."""
        batch, seq = input_ids.shape
        if not self.first:
            streams = torch.empty(
                seq, pipeline_micro_batch_size(self.config, batch), self.config.hidden_size,
                dtype=self.config.params_dtype, device=input_ids.device,
            )
            dist.recv(streams, src=ps.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(streams)
        output = self.model(input_ids, position_ids=position_ids, inference_context=context)
        if not self.last:
            dist.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        if self.parallel_output:
            output = gather_from_tensor_model_parallel_region(
                output.contiguous(), group=ps.get_tensor_model_parallel_group()
            )
        return output.float()

    def share(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's `tensor` on every stage (same shape and dtype everywhere)."""
        if self.pp > 1:
            dist.broadcast(
                tensor,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return tensor


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor, sampling: SamplingParams | None = None) -> GenerationResult:
    """The prompt's logits and the first new token, at any layout (context parallelism included: the
    prompt length must be divisible by the CP size). Every rank passes the same `prompt_ids` [batch, prompt]
    and gets the same token ([batch, 1]) and `prefill_logits` (float32 [batch, prompt, vocab])."""
    sampling = sampling or SamplingParams()
    started = time.perf_counter()
    logits = forward_logits(model, prompt_ids)
    first = sample_next(logits[:, -1], sampling, torch.Generator().manual_seed(sampling.seed))
    return GenerationResult(
        tokens=first.unsqueeze(1), prefill_logits=logits, prefill_seconds=time.perf_counter() - started
    )


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    use_cache: bool = True,
    keep_prefill_logits: bool = False,
    keep_step_logits: bool = False,
    eos_token_id: int | None = None,
) -> GenerationResult:
    """Continue `prompt_ids` [batch, prompt] (same on every rank) by up to `max_new_tokens` tokens.

    model: this rank's `DeepSeekV4Model` (or a one-element chunk list), built with
    `sequence_parallel=False`; it runs in eval mode and is returned in the mode it arrived in. Stops early once every sequence has produced
    `eos_token_id`. `keep_step_logits` keeps each step's last-position logits [batch, vocab]
    (for checking the cache against re-running the prefix).
    """
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError(
                f"generate takes one model chunk per rank, got {len(model)} (virtual pipeline stages "
                "are not supported); build the model without virtual_pipeline_model_parallel_size"
            )
        model = model[0]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = sampling or SamplingParams()
    batch, prompt_len = prompt_ids.shape
    check_token_ids(prompt_ids, get_attr_wrapped_model(model, "vocab_size"))
    longest = get_attr_wrapped_model(model, "max_sequence_length")
    if prompt_len + max_new_tokens > longest:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"max_position_embeddings {longest}; shorten the prompt or lower max_new_tokens"
        )
    with evaluation_mode([model]):
        return _generate(model, prompt_ids, max_new_tokens, sampling, use_cache, keep_prefill_logits,
                         keep_step_logits, eos_token_id)


def _generate(model, prompt_ids, max_new_tokens, sampling, use_cache, keep_prefill_logits, keep_step_logits,
              eos_token_id) -> GenerationResult:
    stage = _PipelineStage(model)
    batch, prompt_len = prompt_ids.shape
    generator = torch.Generator().manual_seed(sampling.seed)
    vocab = get_attr_wrapped_model(model, "vocab_size")
    context = DeepSeekV4InferenceContext(batch, prompt_len + max_new_tokens) if use_cache else None
    result = GenerationResult(tokens=prompt_ids.new_empty(batch, 0))
    sequence = prompt_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)

    for step in range(max_new_tokens):
        started = time.perf_counter()
        new_input = sequence if step == 0 or not use_cache else sequence[:, -1:]
        logits = stage.logits(new_input, context)
        if context is not None:
            context.increment_sequence_len_offset(new_input.shape[1])
            context.enable_decode_mode()
        next_ids = torch.empty(batch, dtype=torch.long, device=prompt_ids.device)
        last_logits = torch.empty(batch, vocab, dtype=torch.float32, device=prompt_ids.device)
        if stage.last:
            last_logits = logits[:, -1]
            next_ids = sample_next(last_logits, sampling, generator)
        next_ids = stage.share(next_ids)
        if step == 0 and keep_prefill_logits:
            full = logits if stage.last else torch.empty(batch, prompt_len, vocab, device=prompt_ids.device)
            result.prefill_logits = stage.share(full.contiguous())
        if keep_step_logits:
            result.step_logits.append(stage.share(last_logits.contiguous()))
        if eos_token_id is not None:
            next_ids = next_ids.masked_fill(finished, eos_token_id)
            finished |= next_ids == eos_token_id
        sequence = torch.cat((sequence, next_ids.unsqueeze(1)), dim=1)
        elapsed = time.perf_counter() - started
        if step == 0:
            result.prefill_seconds = elapsed
        else:
            result.decode_seconds += elapsed
            result.decode_steps += 1
        if eos_token_id is not None and bool(finished.all()):
            break
    result.tokens = sequence[:, prompt_len:]
    return result

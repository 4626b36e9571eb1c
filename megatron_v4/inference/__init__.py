"""Running a trained model: full-vocabulary logits at any layout (`forward_logits`), the decode cache
(`DeepSeekV4InferenceContext`), autoregressive generation (`generate`) and, at any layout including
context parallelism, the prompt's logits and first token (`prefill`)."""

from megatron_v4.inference.decode_context import DeepSeekV4InferenceContext
from megatron_v4.inference.evaluation import forward_logits
from megatron_v4.inference.generation import GenerationResult, SamplingParams, generate, prefill, sample_next

__all__ = [
    "DeepSeekV4InferenceContext",
    "GenerationResult",
    "SamplingParams",
    "forward_logits",
    "generate",
    "prefill",
    "sample_next",
]

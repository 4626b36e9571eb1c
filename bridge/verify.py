"""`verify`: an import checked against transformers' DeepSeek-V4, one decoder layer at a time.

    verify(hf_dir, mcore_dir, layers=None)     # every layer and the logits; or e.g. layers=[0, 3]

The reference is transformers' own modules (`DeepseekV4DecoderLayer`, its rotary embedding,
mask, `hc_head`, norm and head), built without random initialisation and given the Hugging
Face checkpoint's weights decoded by `bridge.reference_decoding`, code written apart from the
FP8/FP4 decoding import uses. The other side is Megatron-Core's `DeepSeekV4TransformerLayer`
(and embedding and head) of the import, read tensor by tensor from its `torch_dist` files
and checked against its checksums.

Both sides get the same input for every layer (the reference's previous output, so each
difference belongs to one layer) and are compared on the attention's output, the MoE's output
and the layer's residual streams, then on the logits through the head. Only one side's
layer is in memory at a time: the peak is about the largest layer in fp32 plus its decoded
tensors (or the embedding or head), whatever the model's size. With chosen `layers`, the
reference still runs the layers before them (to give them their real input), the Megatron-Core
side runs only the chosen ones, and the head is compared only when every layer is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import build_module
from transformers.initialization import no_init_weights
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (
    DeepseekV4DecoderLayer,
    DeepseekV4HyperHead,
    DeepseekV4RMSNorm,
    DeepseekV4RotaryEmbedding,
)

from bridge.checkpoint_dirs import RECORD_DIR, resolve_checkpoint
from bridge.convert import READ_GROUP_BYTES, single_rank
from bridge.hf_config import read_hf_config, transformer_config, transformers_config
from bridge.hf_naming import TRANSFORMERS_MODULE, TRANSLATORS
from bridge.hf_source import HFSource
from bridge.integrity import Checksums
from bridge.mcore_checkpoint import (
    CheckpointReader,
    build_meta_model,
    parameter_sharding,
)
from bridge.reference_decoding import decode
from megatron_v4.runtime.command_line import UsageError
from megatron_v4.runtime.memory import peak_resident_bytes
from megatron_v4.specs import get_dsv4_decoder_block_spec

DEFAULT_RTOL = 1e-2  # bridge/cli.py's --rtol help repeats it
"""A compared output passes when max |diff| <= rtol * max |reference|: room for a bf16 import of fp32 or
fp32-scaled weights (relative rounding 2^-9 per weight), far below what a wrongly decoded tensor gives."""
EMBEDDING_TENSORS = ("embed.weight",)
HEAD_TENSORS = (
    "hc_head_fn",
    "hc_head_base",
    "hc_head_scale",
    "norm.weight",
    "head.weight",
)
MODULE_PREFIX = "model."


@dataclass
class Comparison:
    """One output compared: which part, the official tensors it depends on, and how far apart."""

    part: str
    tensors: str
    max_abs_diff: float
    max_abs_reference: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(
            self.max_abs_reference, torch.finfo(torch.float32).tiny
        )


@dataclass
class VerifyReport:
    sequences: int
    seq_len: int
    layers: list[int]
    comparisons: list[Comparison] = field(default_factory=list)
    min_cosine: float | None = None
    """Of the logits per position; None when the head was not compared (chosen layers)."""
    argmax_agreement: float | None = None
    peak_rss_bytes: int = 0

    def failures(self, rtol: float = DEFAULT_RTOL) -> list[Comparison]:
        return [c for c in self.comparisons if not c.relative <= rtol]  # NaN fails

    def passed(
        self,
        rtol: float = DEFAULT_RTOL,
        min_cosine: float = 0.999,
        min_argmax: float = 0.99,
    ) -> bool:
        logits_ok = self.min_cosine is None or (
            self.min_cosine >= min_cosine and self.argmax_agreement >= min_argmax
        )
        return not self.failures(rtol) and logits_ok


def _layer_groups(layer: int) -> dict[str, str]:
    return {
        "attention": f"layers.{layer}.attn.*, attn_norm, hc_attn_*",
        "moe": f"layers.{layer}.ffn.*, ffn_norm, hc_ffn_*",
        "streams": f"layers.{layer}.*",
    }


# --- the reference: transformers' modules, weights decoded independently --------------------------
class TransformersReference:
    """transformers' DeepSeek-V4 modules one at a time, in fp32, with the checkpoint's decoded weights."""

    def __init__(self, source: HFSource):
        self.source = source
        self.config = transformers_config(source.config)
        # the plain implementations, as a module built outside `from_pretrained` gets them
        self.config._attn_implementation = "eager"
        self.config._experts_implementation = "eager"
        self.translator = TRANSLATORS[TRANSFORMERS_MODULE]

    def _decoded(self, official: str) -> torch.Tensor:
        stored = self.source.tensors[official]
        if stored.scale is None:
            return self.source.read_share(official)
        checkpoint = self.source.checkpoint
        return decode(
            checkpoint.get(stored.name),
            checkpoint.get(stored.scale),
            self.source.fp8_block,
        )

    def state(self, officials, prefix: str) -> dict[str, torch.Tensor]:
        """The official tensors `officials` under transformers' module names less `prefix`, floats in fp32."""
        items = ((name, self._decoded(name)) for name in officials)
        state = {}
        for name, tensor in self.translator.from_official(
            items, num_experts=self.source.config.num_routed_experts
        ):
            state[name.removeprefix(prefix)] = (
                tensor.float() if tensor.is_floating_point() else tensor
            )
        return state

    def built(
        self, make: Callable[[], torch.nn.Module], officials, prefix: str
    ) -> torch.nn.Module:
        """`make()` without initialising its weights (they are allocated, not written), then given the decoded ones."""
        with no_init_weights():
            module = make()
        module.load_state_dict(self.state(officials, prefix), strict=True, assign=True)
        return module.eval()

    def layer(self, index: int) -> DeepseekV4DecoderLayer:
        officials = [n for n in self.source.names() if n.startswith(f"layers.{index}.")]
        return self.built(
            lambda: DeepseekV4DecoderLayer(self.config, index),
            officials,
            f"{MODULE_PREFIX}layers.{index}.",
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedding = self.built(
            lambda: torch.nn.Embedding(self.config.vocab_size, self.config.hidden_size),
            EMBEDDING_TENSORS,
            f"{MODULE_PREFIX}embed_tokens.",
        )
        return embedding(input_ids)

    def head(self, streams: torch.Tensor) -> torch.Tensor:
        """Streams [batch, seq, n, hidden] -> logits, as `DeepseekV4ForCausalLM` ends: lm_head(norm(hc_head(x)))."""
        config = self.config

        def make():
            head = torch.nn.Module()
            head.hc_head = DeepseekV4HyperHead(config)
            head.norm = DeepseekV4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            head.lm_head = torch.nn.Linear(
                config.hidden_size, config.vocab_size, bias=False
            )
            return head

        head = self.built(make, HEAD_TENSORS, MODULE_PREFIX)
        return head.lm_head(head.norm(head.hc_head(streams)))


# --- the import: Megatron-Core's modules, weights from the torch_dist files ------------------------
class MegatronSide:
    """The import's `DeepSeekV4Model` pieces one at a time, in fp32, weights read from its checkpoint."""

    def __init__(self, mcore_dir: str):
        self.checksums = Checksums(mcore_dir)
        config = read_hf_config(os.path.join(mcore_dir, RECORD_DIR))
        self.config = transformer_config(
            config,
            torch.float32,
            mtp_num_layers=0,
            perform_initialization=False,
            use_cpu_initialization=True,
        )
        # on the meta device: the checkpoint's keys and shapes, and the frame whose embedding and head are filled
        self.frame = build_meta_model(self.config)
        sharded = self.frame.sharded_state_dict()
        self.sharding = parameter_sharding(sharded)
        self.reader = CheckpointReader(mcore_dir, sharded)
        self.layer_specs = get_dsv4_decoder_block_spec(self.config).layer_specs

    def _load(self, module: torch.nn.Module, prefix: str) -> None:
        names = [n for n in self.sharding if n.startswith(prefix)]
        tensors = {}
        for name, tensor in self.reader.read(names, max_group_bytes=READ_GROUP_BYTES):
            self.checksums.check_tensor(name, tensor)
            tensors[name.removeprefix(prefix)] = tensor
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        missing = [n for n in missing if not n.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"{prefix}: the checkpoint lacks {missing} / has unexpected {unexpected}"
            )

    def _materialised(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        module.to_empty(device="cpu")
        self._load(module, prefix)
        return module.eval()

    def layer(self, index: int) -> torch.nn.Module:
        layer = build_module(
            self.layer_specs[index],
            config=self.config,
            layer_number=index + 1,
            pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        )
        self._load(layer, f"decoder.layers.{index}.")
        return layer.eval()

    def embed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        embedding = self._materialised(self.frame.embedding, "embedding.")
        try:
            return embedding(input_ids=input_ids, position_ids=position_ids)
        finally:
            embedding.to(device="meta")

    def head(self, streams: torch.Tensor) -> torch.Tensor:
        """Streams [seq, batch, n, hidden] -> logits [seq, batch, vocab]."""
        parts = [
            (self.frame.decoder.hc_head, "decoder.hc_head."),
            (self.frame.decoder.final_layernorm, "decoder.final_layernorm."),
            (self.frame.output_layer, "output_layer."),
        ]
        try:
            for module, prefix in parts:
                self._materialised(module, prefix)
            return self.frame.output_layer(
                self.frame.decoder.collapse_streams(streams)
            )[0]
        finally:
            for module, _ in parts:
                module.to(device="meta")


# --- the comparison -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _captured(modules: dict[str, torch.nn.Module]):
    """The first output tensor of each module's forward, by key."""
    outputs, handles = {}, []
    for key, module in modules.items():

        def hook(_, __, output, key=key):
            outputs[key] = output[0] if isinstance(output, tuple) else output

        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _compare(
    part: str, tensors: str, got: torch.Tensor, expected: torch.Tensor
) -> Comparison:
    got, expected = got.float(), expected.float()
    if got.shape != expected.shape:
        raise ValueError(
            f"{part}: Megatron-Core gives shape {tuple(got.shape)}, transformers {tuple(expected.shape)}"
        )
    return Comparison(
        part, tensors, (got - expected).abs().max().item(), expected.abs().max().item()
    )


def verify(
    hf_dir,
    mcore_dir,
    sequences: int = 3,
    seq_len: int = 48,
    seed: int = 0,
    iteration: int | None = None,
    layers: list[int] | None = None,
    progress: bool = True,
) -> VerifyReport:
    """Compare transformers on the Hugging Face checkpoint with Megatron-Core on its import, layer by layer
    (`layers`: those only, None: all and the logits)."""
    source = HFSource(hf_dir)
    num_layers = source.config.num_layers
    chosen = list(range(num_layers)) if layers is None else sorted(set(layers))
    if chosen[0] < 0 or chosen[-1] >= num_layers:
        raise UsageError(
            f"--layers {','.join(map(str, chosen))}: the checkpoint has layers 0..{num_layers - 1}"
        )
    report = VerifyReport(sequences, seq_len, chosen)
    reference = TransformersReference(source)
    input_ids = torch.randint(
        0,
        source.config.vocab_size,
        (sequences, seq_len),
        generator=torch.Generator().manual_seed(seed),
    )
    position_ids = torch.arange(seq_len).unsqueeze(0)
    start = time.monotonic()
    with single_rank(), torch.no_grad():
        ours = MegatronSide(resolve_checkpoint(mcore_dir, iteration))
        embedded = reference.embed(input_ids)
        got = ours.embed(input_ids, position_ids.expand_as(input_ids))
        report.comparisons.append(
            _compare("embedding", "embed.weight", got.transpose(0, 1), embedded)
        )
        # transformers' DeepseekV4Model.forward: the mask, both rotary tables, the embedding copied into hc_mult streams
        mask = create_sliding_window_causal_mask(
            config=reference.config,
            inputs_embeds=embedded,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        rotary = DeepseekV4RotaryEmbedding(reference.config)
        position_embeddings = {
            kind: rotary(embedded, position_ids=position_ids, layer_type=kind)
            for kind in ("main", "compress")
        }
        streams = (
            embedded.unsqueeze(2)
            .expand(-1, -1, reference.config.hc_mult, -1)
            .contiguous()
        )
        del embedded, got
        for index in range(chosen[-1] + 1):
            layer = reference.layer(index)
            with _captured(
                {"attention": layer.self_attn, "moe": layer.mlp}
            ) as expected:
                output = layer(
                    streams,
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    attention_mask=mask,
                    input_ids=input_ids,
                )
            del layer
            if index in chosen:
                layer = ours.layer(index)
                with _captured(
                    {"attention": layer.self_attention, "moe": layer.mlp}
                ) as got:
                    got_streams = layer(
                        streams.transpose(0, 1),
                        position_ids=position_ids.expand_as(input_ids),
                        token_ids=input_ids.transpose(0, 1).contiguous(),
                    )
                del layer
                groups = _layer_groups(index)
                compared = [
                    _compare(
                        f"layer {index} {part}",
                        groups[part],
                        got[part].transpose(0, 1),
                        expected[part],
                    )
                    for part in ("attention", "moe")
                ]
                compared.append(
                    _compare(
                        f"layer {index} streams",
                        groups["streams"],
                        got_streams.transpose(0, 1),
                        output,
                    )
                )
                report.comparisons.extend(compared)
                if progress:
                    parts = ", ".join(
                        f"{c.part.split()[-1]} {c.relative:.2e}" for c in compared
                    )
                    print(
                        f"[verify] layer {index} ({chosen.index(index) + 1}/{len(chosen)}, "
                        f"{time.monotonic() - start:.0f} s): max |diff| / max |reference|: {parts}",
                        file=sys.stderr,
                        flush=True,
                    )
            streams = output
        if layers is None:
            expected = reference.head(streams)
            got = ours.head(streams.transpose(0, 1)).transpose(0, 1)
            report.comparisons.append(
                _compare("logits", ", ".join(HEAD_TENSORS), got, expected)
            )
            cosine = torch.nn.functional.cosine_similarity(
                got.flatten(0, 1), expected.flatten(0, 1), dim=-1
            )
            report.min_cosine = cosine.min().item()
            report.argmax_agreement = (
                (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
            )
    report.peak_rss_bytes = peak_resident_bytes()
    return report

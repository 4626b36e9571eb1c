"""Building a DeepSeek-V4 model directly from a `DeepSeekV4TransformerConfig`, as README.md shows it.

    python examples/model_api.py
    torchrun --nproc-per-node 2 examples/model_api.py --tp 2
"""

import argparse

import torch

import megatron_v4
from megatron_v4 import DeepSeekV4Model, DeepSeekV4TransformerConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tp", type=int, default=1)
args = parser.parse_args()

layout = megatron_v4.initialize(tp=args.tp, sp=args.tp > 1, seed=1234)
config = DeepSeekV4TransformerConfig(
    num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=32, q_lora_rank=32,
    qk_rope_head_dim=16, o_groups=2, o_lora_rank=16, sliding_window=8, compress_ratios=[0, 4, 128, 4],
    index_n_heads=16, index_head_dim=32, index_topk=4, num_hash_layers=1,
    num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
    vocab_size=128, layernorm_epsilon=1e-6, use_cpu_initialization=True, **layout.config_kwargs())
model = DeepSeekV4Model(config)   # forward(input_ids, position_ids=None, attention_mask=None, labels=None)

input_ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
per_token_loss = model(input_ids, labels=torch.roll(input_ids, -1, dims=1))   # [batch, seq], training mode
per_token_loss[:, :-1].mean().backward()
logits = megatron_v4.forward_logits(model, input_ids)                          # [batch, seq, vocab], eval pass
print(f"loss {per_token_loss[:, :-1].mean().item():.4f}, logits {tuple(logits.shape)}")

# A packed row of documents (README: Long context).
input_ids = torch.randint(0, 128, (1, 168), generator=torch.Generator().manual_seed(1))
labels = torch.roll(input_ids, -1, dims=1)
from megatron_v4.packing import document_loss_mask, packed_seq_params

cu_seqlens = [0, 37, 38, 168]                       # three documents in one row of 168 tokens
params = packed_seq_params(cu_seqlens)              # PackedSeqParams(qkv_format="thd", ...)
per_token = model(input_ids, labels=labels, packed_seq_params=params)  # input_ids [1, 168]
loss_mask = document_loss_mask(cu_seqlens)          # 0 at each document's last token
loss = (per_token[0] * loss_mask).sum() / loss_mask.sum()
logits = megatron_v4.forward_logits(model, input_ids, cu_seqlens=cu_seqlens)  # any layout
print(f"packed row: loss {loss.item():.4f}, logits {tuple(logits.shape)}")
megatron_v4.destroy()

"""transformers' in-memory DeepseekV4 names -> the Megatron-Core names of the contract.

Written here for the parity tests (tests/test_attention_parity.py,
tests/test_model_parity.py) as an independent reference: deliberately not the
bridge's tables.
"""

# One attention module (DeepseekV4Attention -> DeepSeekV4HybridSelfAttention), compressor and indexer included.
ATTENTION_NAMES = {
    "q_a_proj.weight": "linear_q_down_proj.weight",
    "q_a_norm.weight": "q_layernorm.weight",
    "q_b_proj.weight": "linear_q_up_proj.weight",
    "kv_proj.weight": "linear_kv.weight",
    "kv_norm.weight": "kv_layernorm.weight",
    "sinks": "attn_sink",
    "o_a_proj.weight": "linear_o_down_proj.weight",
    "o_b_proj.weight": "linear_proj.weight",
    "compressor.kv_proj.weight": "compressor.linear_kv.weight",
    "compressor.gate_proj.weight": "compressor.linear_gate.weight",
    "compressor.position_bias": "compressor.ape",
    "compressor.kv_norm.weight": "compressor.norm.weight",
    "compressor.indexer.kv_proj.weight": "indexer.compressor.linear_kv.weight",
    "compressor.indexer.gate_proj.weight": "indexer.compressor.linear_gate.weight",
    "compressor.indexer.position_bias": "indexer.compressor.ape",
    "compressor.indexer.kv_norm.weight": "indexer.compressor.norm.weight",
    "compressor.indexer.q_b_proj.weight": "indexer.linear_q_up_proj.weight",
    "compressor.indexer.scorer.weights_proj.weight": "indexer.linear_weights_proj.weight",
}

"""Rank function for tests/test_weight_sync.py: bucketed export from a layout, then an in-place update."""

from __future__ import annotations

import torch

import megatron_v4
from bridge import AutoBridge
from bridge.safetensors_io import SafetensorsCheckpoint


def export_then_update(checkpoint: str, update: str, layout: dict, bucket_bytes: int, token_ids) -> dict:
    """Bucketed exports (to every rank, to each tensor's owner) of the model loaded from `checkpoint`, then the
    model updated in place from the tensors of `update` sent in buckets: its tensors' addresses before and after,
    its export and logits."""
    megatron_v4.initialize(**layout)
    try:
        bridge = AutoBridge.from_hf_pretrained(checkpoint)
        chunks = bridge.to_megatron_model(dtype=torch.float32)
        buckets = [
            [(n, t.clone()) for n, t in bucket]
            for bucket in bridge.export_hf_weights(chunks, bucket_bytes=bucket_bytes)
        ]
        owned = {n: t.clone() for n, t in bridge.export_hf_weights(chunks, ranks="owner")}

        def addresses():
            return {
                n: t.data_ptr()
                for c in chunks
                for n, t in c.state_dict(keep_vars=True).items()
                if isinstance(t, torch.Tensor)
            }

        before = addresses()
        sent = SafetensorsCheckpoint(update).items()
        bridge.load_hf_weights(chunks, (sent_bucket for sent_bucket in _in_buckets(sent, bucket_bytes)))
        after = addresses()
        updated = dict(bridge.export_hf_weights(chunks))
        logits = megatron_v4.forward_logits(chunks, token_ids)
        return dict(buckets=buckets, owned=owned, same_tensors=before == after, updated=updated, logits=logits)
    finally:
        megatron_v4.destroy()


def _in_buckets(items, bucket_bytes: int):
    """The sender's side, written here independently of the bridge: dicts of about `bucket_bytes`."""
    bucket = {}
    for name, tensor in items:
        bucket[name] = tensor
        if sum(t.nbytes for t in bucket.values()) >= bucket_bytes:
            yield bucket
            bucket = {}
    if bucket:
        yield bucket

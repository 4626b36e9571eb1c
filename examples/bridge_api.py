"""The bridge's Python API, as README.md shows it: a Hugging Face checkpoint into Megatron-Core at any
layout, a forward pass, and back to Hugging Face.

    python examples/bridge_api.py
    torchrun --nproc-per-node 2 examples/bridge_api.py --tp 2      # or --ep 2, --pp 2
"""

import argparse

import torch

import megatron_v4
from bridge import AutoBridge, make_tiny_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--ep", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
parser.add_argument("--workdir", default="/tmp/dsv4-bridge-api")
args = parser.parse_args()

layout = megatron_v4.initialize(tp=args.tp, ep=args.ep, pp=args.pp)
if torch.distributed.get_rank() == 0:                     # one writer; the others wait for it
    make_tiny_checkpoint(f"{args.workdir}/hf", naming="official", seed=0)   # random tiny DeepSeek-V4 with MTP
torch.distributed.barrier()

bridge = AutoBridge.from_hf_pretrained(f"{args.workdir}/hf")   # a directory in any naming, or a DeepseekV4ForCausalLM
print(bridge)   # AutoBridge(naming='official', config_flavour='official', layers=4, ..., mtp_layers=1)
model = bridge.to_megatron_model(dtype=torch.float32)          # this rank's model chunks, weights loaded
input_ids = torch.randint(0, bridge.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
logits = megatron_v4.forward_logits(model, input_ids)          # [batch, seq, vocab] on every rank
print(f"logits {tuple(logits.shape)}, first row argmax {logits[0].argmax(-1).tolist()}")
tensors = sum(1 for _ in bridge.export_hf_weights(model))      # full tensors, official names, any layout
buckets = bridge.export_hf_weights(model, bucket_bytes=1 << 20)  # RL weight sync: lists of up to 1 MB of tensors
bridge.load_hf_weights(model, buckets)                          # in place, from any (name, tensor) iterable
bridge.save_hf_pretrained(model, f"{args.workdir}/hf-out")     # official safetensors + config.json (rank 0 writes)
print(f"exported {tensors} tensors to {args.workdir}/hf-out")
megatron_v4.destroy()

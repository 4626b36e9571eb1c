"""Quick demo: a tiny random DeepSeek-V4 checkpoint through the bridge and back.

Makes an official-flavour checkpoint (with MTP), loads it into Megatron-Core,
compares logits with transformers' DeepseekV4ForCausalLM on the same weights,
exports it back and checks every tensor is bit-identical. Exits non-zero on
any mismatch.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import DeepseekV4ForCausalLM

import megatron_v4
from bridge import AutoBridge, make_tiny_checkpoint
from bridge.safetensors_io import SafetensorsCheckpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    parser.add_argument("--seq-len", type=int, default=140, help="tokens per sequence (140 reaches the HCA window)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        hf_dir, out_dir = work / "tiny-dsv4", work / "tiny-dsv4-exported"
        make_tiny_checkpoint(hf_dir, flavour="official", seed=0)
        megatron_v4.initialize()
        try:
            bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
            print(f"checkpoint: {bridge}")
            model = bridge.to_megatron_model(dtype=torch.float32)
            tokens = torch.randint(0, bridge.config.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ours = model[0].eval()(tokens)
                reference = DeepseekV4ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()(tokens).logits
            diff = (ours - reference).abs().max().item()
            cosine = torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0).item()
            print(f"logits vs transformers: max |diff| {diff:.2e} (max |logit| {reference.abs().max():.2f}), cosine {cosine:.8f}")

            bridge.save_hf_pretrained(model, str(out_dir))
            source, exported = SafetensorsCheckpoint(hf_dir), SafetensorsCheckpoint(out_dir)
            names = sorted(source.names())
            mismatched = [n for n in names if not torch.equal(source.get(n), exported.get(n))]
            extra = sorted(set(exported.names()) - set(names))
            print(f"round trip HF -> MCore -> HF: {len(names) - len(mismatched)}/{len(names)} tensors bit-identical"
                  + (f", extra {extra}" if extra else ""))
        finally:
            megatron_v4.destroy()
    ok = diff <= 1e-4 and not mismatched and not extra
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

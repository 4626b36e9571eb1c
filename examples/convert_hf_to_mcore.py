"""Convert a Hugging Face DeepSeek-V4 checkpoint to a Megatron-Core `torch_dist` checkpoint.

    python examples/convert_hf_to_mcore.py --hf /data/DeepSeek-V4-Flash --out /data/dsv4-flash-mcore [--dtype bf16]

Any of the three namings (official, transformers' save_pretrained, transformers'
module names), either config flavour, FP8/FP4 or not, single file or sharded.
Streams tensor by tensor: memory stays at a few times the largest tensor. The
result loads at any TP/PP/EP with `dist_checkpointing.load(model.sharded_state_dict(), dir)`
or `bridge.convert.load_megatron_model(dir)`. Same as `python -m bridge import`.
"""

import sys

from bridge.cli import main

if __name__ == "__main__":
    sys.exit(main(["import", *sys.argv[1:]]))

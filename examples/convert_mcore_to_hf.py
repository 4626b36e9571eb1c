"""Convert a Megatron-Core checkpoint written by the importer (maybe trained since) back to Hugging Face.

    python examples/convert_mcore_to_hf.py --mcore /data/dsv4-flash-mcore --out /data/dsv4-flash-hf [--dtype source]

Writes safetensors shards with official names, an index and an official-flavour `config.json`.
`--dtype source` (default) re-quantises every tensor to the format it had in the
original checkpoint: unchanged weights give back the original bytes exactly,
trained ones are quantised to the nearest representable values. `--dtype bf16`
writes no FP8/FP4. Same as `python -m bridge export`.
"""

import sys

from bridge.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))

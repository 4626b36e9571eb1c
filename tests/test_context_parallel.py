"""Context parallelism (`cp`): DeepSeekV4Model with every sequence split into contiguous chunks over
the CP ranks equals the one-rank model (fp32, gloo).

The model and the checks are those of tests/test_model_layouts.py (sliding, CSA and HCA layers,
hash routing, experts with learned biases, one MTP layer and the indexer loss; `forward_logits`,
main/MTP/indexer losses and grad norms of three Adam steps, every parameter's gradient, the weights
after the steps). The sequence (132 tokens) gives chunks of 66 and 33 tokens: the HCA layer's only
entry pools tokens of every chunk, CSA windows straddle the 33-token chunk boundaries, and every
chunk's sliding window reaches into the previous chunk.

Every layout runs twice in one group of ranks: on whole sequences, and on the same tokens as packed
rows of documents (`dsv4_layout_ranks.PACKED_ROWS`) whose documents, sliding windows and CSA windows
straddle the chunk boundaries, each against the one-rank run of the same data (the one-rank packed
row is checked against transformers per document by tests/test_packed_sequences.py).
"""

from __future__ import annotations

import pytest

import dsv4_layout_ranks as ranks
from megatron_v4.runtime.ranks import run_on_ranks
from test_model_layouts import _check_logits, _check_training

# The sparse indexer loss (top-k attention) trains the indexer: its own gradient path through the gathered
# keys. index_topk covers every entry: with random weights the indexer's scores nearly tie, and a pick
# flipped by fp32 reduction order (a discrete change) would differ by more than any tolerance; the picks
# still go through the top-k path (gathered per query, invisible ones dropped).
INDEXER_LOSS = dict(indexer_loss_coeff=0.1, indexer_use_sparse_loss=True, index_topk=64)
# Adam turns the indexer's tiny loss gradients into full-size steps: its weights after three steps
# differ by 2.4e-5 at TP=2+SP too (an existing layout), so weights are checked at 1e-4 here.
WEIGHT_TOLERANCE = 1e-4
ONE_STAGE = {((1, 2, 3, 4),)}
TWO_STAGES = {((1, 2),), ((3, 4),)}
# (ranks, initialize() arguments, the decoder layers of each rank's chunks)
LAYOUTS = {
    "cp2": (2, dict(cp=2), ONE_STAGE),
    "cp4": (4, dict(cp=4), ONE_STAGE),
    "cp2-tp2sp": (4, dict(cp=2, tp=2, sp=True), ONE_STAGE),
    "cp2-ep2": (2, dict(cp=2, ep=2), ONE_STAGE),
    "cp2-pp2": (4, dict(cp=2, pp=2), TWO_STAGES),
}


@pytest.fixture(scope="module")
def references():
    """[whole sequences, packed rows] at one rank."""
    (results,) = run_on_ranks(ranks.train_plain_and_packed, 1, {}, None, INDEXER_LOSS, timeout=180)
    return results


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tag", list(LAYOUTS))
def test_context_parallel_trains_like_one_rank(references, tag):
    world, layout, placement = LAYOUTS[tag]
    per_rank = run_on_ranks(
        ranks.train_plain_and_packed, world, layout, references[0]["initial"], INDEXER_LOSS, timeout=360
    )
    for run, (data, reference) in enumerate(zip(("whole", "packed"), references)):
        results, label = [rank_results[run] for rank_results in per_rank], f"{tag} {data}"
        assert {tuple(map(tuple, result["stage_layers"])) for result in results} == placement
        _check_logits(results, reference, label)
        _check_training(results, reference, label, weight_tolerance=WEIGHT_TOLERANCE)
        indexer = max(
            abs(a - b) / abs(b)
            for result in results
            for a, b in zip(result["indexer_losses"], reference["indexer_losses"])
        )
        print(f"[{label}] indexer losses relative diff {indexer:.1e}")
        assert indexer <= 1e-5


def test_context_parallel_memory_falls_with_cp():
    """What one CSA layer keeps for the backward per rank (tiny dims, 2048 tokens, indexer loss on) at
    CP=2 is at most 0.6x of CP=1: no rank holds the whole sequence's input or compresses the whole
    prefix (gathering the input made the last rank keep more than at CP=1)."""
    # A model width above the attention's (4 heads of 16) as in DeepSeek-V4 (7168 vs 128 heads of 512 / tp).
    length, config = 2048, dict(INDEXER_LOSS, hidden_size=256)
    (one_rank,) = run_on_ranks(ranks.csa_layer_saved_bytes, 1, 1, length, config, timeout=120)
    per_rank = run_on_ranks(ranks.csa_layer_saved_bytes, 2, 2, length, config, timeout=120)
    print(f"saved bytes: one rank {one_rank}, per rank at CP=2 {per_rank}")
    assert max(per_rank) <= 0.6 * one_rank

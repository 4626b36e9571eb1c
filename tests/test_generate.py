"""Generation with the decode cache against transformers (float32, CPU).

The checkpoint is bridge.tiny's random model (window 8, layers with ratios 0, 4,
128, 4, 16 indexer heads so that indexer top-k ties do not happen) written in the
official naming with MTP tensors; the reference is transformers'
DeepseekV4ForCausalLM loaded from the same files. Prompt lengths are chosen so
that prefill and decode cross the window (8), the CSA windows (4) and the HCA
window (128): 6 (prefill shorter than the window), 125 (decode emits the first
HCA entry), 131 (prefill already holds an HCA entry and an unfinished CSA window).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, DeepseekV4ForCausalLM

import megatron_v4
from bridge import AutoBridge, make_tiny_checkpoint
from bridge.convert import import_checkpoint
from generate_ranks import generate_at_layouts, load_generate_example
from megatron_v4.inference import DeepSeekV4InferenceContext
from megatron_v4.inference import SamplingParams, generate, sample_next
from megatron_v4.runtime.command_line import UsageError
from megatron_v4.runtime.ranks import run_on_ranks

pytestmark = pytest.mark.timeout(300)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", naming="official", seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return DeepseekV4ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def prompt_ids(length: int, vocab: int = 128, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(length))


def transformers_greedy(reference, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> list[int]:
    # An explicit mask: without one, generate() would take prompt tokens equal to pad_token_id for padding.
    out = reference.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("length", [6, 131])
def test_cli_greedy_tokens_and_prefill_logits_match_transformers(checkpoint, reference, tmp_path, length):
    prompt = prompt_ids(length)
    json_file, logits_file = tmp_path / "out.json", tmp_path / "logits.pt"
    torch.set_num_threads(1)
    load_generate_example().main([
        "--hf", str(checkpoint), "--prompt-ids", ",".join(map(str, prompt[0].tolist())),
        "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--ignore-eos",
        "--json", str(json_file), "--save-logits", str(logits_file),
    ])
    written = json.loads(json_file.read_text())
    tokens = transformers_greedy(reference, prompt)
    # the tiny checkpoint ships a tokenizer: the CLI decodes with it
    text = AutoTokenizer.from_pretrained(checkpoint).decode(tokens, skip_special_tokens=True)
    assert written == {"tokens": tokens, "text": text}

    with torch.no_grad():
        expected = reference(prompt).logits[0]
    logits = torch.load(logits_file)
    assert logits.shape == (length, 128) and logits.dtype == torch.float32
    diff = (logits - expected).abs().max().item()
    print(f"prompt {length}: prefill logits max |diff| vs transformers {diff:.2e}")
    assert diff <= 1e-4


def word_tokenizer(directory) -> str:
    """A word-level tokenizer over the tiny vocabulary ("w000" .. "w127") with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"w{i:03d}": i for i in range(128)}, unk_token="w002"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="w000", eos_token="w001", unk_token="w002")
    tokenizer.chat_template = (
        "{% for m in messages %}w003 {{ m['content'] }} w004 {% endfor %}{% if add_generation_prompt %}w005{% endif %}"
    )
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_cli_text_prompt_uses_chat_template_and_stops_at_eos(checkpoint, reference, tmp_path):
    tokenizer_dir = word_tokenizer(tmp_path / "tokenizer")
    words = " ".join(f"w{i:03d}" for i in prompt_ids(20)[0].tolist())
    json_file = tmp_path / "out.json"
    torch.set_num_threads(1)
    load_generate_example().main([
        "--hf", str(checkpoint), "--tokenizer", tokenizer_dir, "--prompt", words,
        "--max-new-tokens", "40", "--greedy", "--json", str(json_file),
    ])
    written = json.loads(json_file.read_text())

    # The chat template by hand: w003 <words> w004 w005.
    prompt = torch.tensor([[3, *prompt_ids(20)[0].tolist(), 4, 5]])
    expected = reference.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, eos_token_id=1, pad_token_id=1
    )[0, prompt.shape[1]:].tolist()
    assert expected[-1] == 1 and len(expected) < 40, "this prompt is meant to reach the end-of-sequence token"
    assert written["tokens"] == expected
    assert written["text"] == " ".join(f"w{i:03d}" for i in expected if i != 1)


@pytest.fixture
def model(checkpoint):
    megatron_v4.initialize()
    yield AutoBridge.from_hf_pretrained(str(checkpoint)).to_megatron_model(dtype=torch.float32)[0].eval()
    megatron_v4.destroy()


def test_decode_cache_logits_equal_full_rerun_each_step(model, reference):
    torch.set_num_threads(1)
    prompt = prompt_ids(125, batch=2)
    cached = generate(model, prompt, NEW_TOKENS, use_cache=True, keep_step_logits=True)
    rerun = generate(model, prompt, NEW_TOKENS, use_cache=False, keep_step_logits=True)
    assert torch.equal(cached.tokens, rerun.tokens)
    diffs = [(a - b).abs().max().item() for a, b in zip(cached.step_logits, rerun.step_logits)]
    print(f"cache vs full re-run, worst step logits |diff| {max(diffs):.2e}")
    assert len(diffs) == NEW_TOKENS and max(diffs) <= 1e-4
    # Both equal transformers' own logits of the generated sequence, step by step.
    with torch.no_grad():
        expected = reference(torch.cat((prompt, cached.tokens[:, :-1]), dim=1)).logits[:, prompt.shape[1] - 1:]
    assert (torch.stack(cached.step_logits, dim=1) - expected).abs().max().item() <= 1e-4

    sampling = SamplingParams(greedy=False, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    sampled = generate(model, prompt, 12, sampling, use_cache=True)
    assert torch.equal(sampled.tokens, generate(model, prompt, 12, sampling, use_cache=False).tokens)
    assert not torch.equal(sampled.tokens, cached.tokens[:, :12])


def test_several_tokens_at_once_extend_the_decode_state(model, reference):
    """Prefill 100 tokens, then feed 33 (crossing the HCA window at 128) and 1 in one forward each."""
    torch.set_num_threads(1)
    tokens = prompt_ids(134, batch=2)
    context = DeepSeekV4InferenceContext(max_batch_size=2, max_sequence_length=134)
    pieces = []
    with torch.no_grad():
        for chunk in tokens.split([100, 33, 1], dim=1):
            pieces.append(model(chunk, inference_context=context))
            context.increment_sequence_len_offset(chunk.shape[1])
        expected = reference(tokens).logits
    diff = (torch.cat(pieces, dim=1) - expected).abs().max().item()
    print(f"prefill 100 + 33 + 1 tokens vs transformers: logits max |diff| {diff:.2e}")
    assert diff <= 1e-4


def test_parallel_layouts_match_transformers(checkpoint, reference, tmp_path):
    mcore = tmp_path / "mcore"
    import_checkpoint(checkpoint, mcore, torch.float32, progress=False)
    prompt = prompt_ids(125)
    hf = ["--hf", str(checkpoint)]
    runs = [hf + ["--tp", "2"], hf + ["--ep", "2"], hf + ["--pp", "2"], ["--mcore", str(mcore), "--tp", "2", "--ep", "2"]]
    per_rank = run_on_ranks(generate_at_layouts, 2, prompt[0].tolist(), NEW_TOKENS, runs, timeout=280)
    expected = transformers_greedy(reference, prompt)
    for rank, results in enumerate(per_rank):
        for flags, tokens in zip(runs, results):
            assert tokens == expected, f"rank {rank}: {' '.join(flags)}"


def test_sampling_keeps_only_top_k_and_top_p_tokens():
    probabilities = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probabilities.log()
    generator = torch.Generator().manual_seed(0)

    def draws(**params) -> set[int]:
        sampling = SamplingParams(greedy=False, **params)
        return {sample_next(logits, sampling, generator).item() for _ in range(300)}

    assert sample_next(logits, SamplingParams(greedy=True), generator).item() == 1
    assert draws(top_k=2) == {1, 3}
    # Sorted: 0.5, 0.3, 0.15, 0.05; the first two reach 0.75, so the rest are dropped.
    assert draws(top_p=0.75) == {1, 3}
    assert draws(top_p=0.81) == {1, 3, 2}
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=1) == {1}


def test_cli_prefill_at_cp2_matches_transformers(checkpoint, reference, tmp_path, monkeypatch):
    """`--cp 2`: the prompt (132 tokens: the HCA layer's entry pools both chunks) split over two ranks;
    the saved prefill logits and the first new token are transformers'. Decoding under CP is refused."""
    prompt = prompt_ids(132)
    logits_file = tmp_path / "logits.pt"
    runs = [["--hf", str(checkpoint), "--cp", "2", "--save-logits", str(logits_file)]]
    per_rank = run_on_ranks(generate_at_layouts, 2, prompt[0].tolist(), 1, runs, timeout=200)
    with torch.no_grad():
        expected = reference(prompt).logits[0]
    assert [results[0] for results in per_rank] == [[int(expected[-1].argmax())]] * 2
    diff = (torch.load(logits_file) - expected).abs().max().item()
    print(f"prefill at cp=2 vs transformers: logits max |diff| {diff:.2e}")
    assert diff <= 1e-4
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--cp 2 splits the prompt's prefill only"):
        load_generate_example().main(["--cp", "2", "--max-new-tokens", "2"])

"""Chat fine-tuning data (`--sft-data`) and packed pretraining documents (`--pack-documents`).

Checked against references written here or taken from transformers:
- the assistant-token mask equals transformers' own `return_assistant_tokens_mask` (the template's
  `{% generation %}` markers), also when our renderer gets the template without those markers, and the
  masked tokens decode to each answer followed by EOS;
- packing: each row's documents are the conversations (next-fit in file order, lengths from transformers'
  rendering), the rest of a row is a filler document without loss, and the loss falls exactly where the
  next token is the assistant's within the same conversation;
- every bad row is refused in one line naming the file and line;
- `--pack-documents`: cu_seqlens at the end-of-document tokens of an indexed dataset, no loss across them.
"""

from __future__ import annotations

import itertools
import json

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from pretrain_runs import imported_tiny, launch

from bridge.tiny import CHAT_TEMPLATE_FILE, EOS, TINY, make_tiny_model, tiny_tokenizer
from megatron_v4.training.data import VocabTokenizer, build_dataset
from megatron_v4.training.sft import ChatRenderer, pack, read_conversations, row_sample

CHATS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [
        {"role": "system", "content": "Answer in digits."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+5?"},
        {"role": "assistant", "content": "8"},
    ],
    [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue"}],
    [
        {"role": "user", "content": "spell cat"},
        {"role": "assistant", "content": "c-a-t"},
        {"role": "user", "content": "backwards?"},
        {"role": "assistant", "content": "t-a-c"},
    ],
]


def _write_chats(path, chats) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return str(path)


def _transformers_rendering(tokenizer, messages) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def test_assistant_mask_is_exactly_the_assistant_tokens(tmp_path):
    tokenizer = tiny_tokenizer()
    with open(CHAT_TEMPLATE_FILE) as f:
        unmarked = f.read().replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    assert "{%- generation" not in unmarked and "endgeneration" not in unmarked
    conversations = read_conversations(_write_chats(tmp_path / "chats.jsonl", CHATS))
    for renderer in (ChatRenderer(tokenizer), ChatRenderer(tokenizer, unmarked)):
        for conversation, messages in zip(conversations, CHATS):
            ids, mask = renderer.render(conversation)
            expected_ids, expected_mask = _transformers_rendering(tokenizer, messages)
            assert ids == expected_ids
            assert [int(m) for m in mask] == expected_mask
            # Independently of any mask machinery: the masked runs are the answers, each with its EOS.
            runs = [
                tokenizer.decode([t for t, _ in run])
                for key, run in itertools.groupby(zip(ids, mask), key=lambda x: x[1])
                if key
            ]
            assert runs == [m["content"] + EOS for m in messages if m["role"] == "assistant"]


def _next_fit(lengths: list[int], seq_length: int) -> list[list[int]]:
    rows, row = [], []
    for i, n in enumerate(lengths):
        if sum(lengths[j] for j in row) + n > seq_length:
            rows.append(row)
            row = []
        row.append(i)
    return rows + [row]


def test_packing_keeps_whole_conversations_and_their_boundaries(tmp_path):
    tokenizer = tiny_tokenizer()
    chats = CHATS * 3
    conversations = read_conversations(_write_chats(tmp_path / "chats.jsonl", chats))
    rendered = [_transformers_rendering(tokenizer, m) for m in chats]
    seq_length = 80
    rows = pack(conversations, ChatRenderer(tokenizer), seq_length, filler=tokenizer.eos_token_id)
    expected_rows = _next_fit([len(ids) for ids, _ in rendered], seq_length)
    assert len(rows) == len(expected_rows) > 1
    for row, members in zip(rows, expected_rows):
        sample = row_sample(row)
        lengths = [len(rendered[i][0]) for i in members]
        used = sum(lengths)
        expected_cu = list(itertools.accumulate([0, *lengths])) + ([seq_length] if used < seq_length else [])
        assert sample["cu_seqlens"].tolist() == expected_cu
        tokens = sample["tokens"].tolist()
        concatenated = [t for i in members for t in rendered[i][0]]
        assert tokens == concatenated + [tokenizer.eos_token_id] * (seq_length - used)
        # The loss at position p trains tokens[p + 1]: only an assistant token of the same conversation.
        expected_loss = []
        for i in members:
            ids, assistant = rendered[i]
            expected_loss += [float(assistant[p + 1]) for p in range(len(ids) - 1)] + [0.0]
        expected_loss += [0.0] * (seq_length - used)
        assert sample["loss_mask"].tolist() == expected_loss
        trained = sample["loss_mask"].bool()
        assert torch.equal(sample["labels"][:-1][trained[:-1]], sample["tokens"][1:][trained[:-1]])
        assert sample["loss_mask"].sum() == sum(sum(rendered[i][1]) for i in members)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "line 2: not valid JSON"),
        ('{"text": "hi"}', 'line 2: expected {"messages"'),
        ('{"messages": [{"role": "user"}]}', "line 2: message 0 needs a string content"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "line 2: the first message is the assistant's"),
        (
            '{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            "line 2: the chat template refused it",
        ),
        # BOS, <｜User｜>, 70 characters, <｜Assistant｜>, </think>, "y", EOS
        (
            json.dumps({"messages": [{"role": "user", "content": "x" * 70}, {"role": "assistant", "content": "y"}]}),
            "line 2: the conversation is 76 tokens, longer than --seq-length 64; raise --seq-length",
        ),
    ],
    ids=["json", "no-messages", "no-content", "no-assistant", "assistant-first", "role", "too-long"],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as error:
        pack(read_conversations(str(path)), ChatRenderer(tiny_tokenizer()), 64, filler=2)
    assert f"{path} {message}" in str(error.value)
    assert "\n" not in str(error.value)


def test_templates_that_cannot_give_an_assistant_mask_are_refused(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template .* pass --chat-template FILE"):
        ChatRenderer(tokenizer)
    # Renders only the last answer in full, as thinking templates drop earlier reasoning.
    rewriting = (
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}"
        "{% else %}...{% endif %}{% endfor %}"
    )
    conversations = read_conversations(_write_chats(tmp_path / "chats.jsonl", CHATS[1:2]))
    with pytest.raises(ValueError, match=r"chats.jsonl line 1: the chat template renders message 2 differently"):
        ChatRenderer(tokenizer, rewriting).render(conversations[0])


def test_pack_documents_gives_cu_seqlens_at_the_end_of_document_tokens(tmp_path):
    vocab = VocabTokenizer(64)
    # Document d is made of token d only, so a document is a run of equal tokens and its end-of-document token.
    lengths = [3, 7, 1, 12, 5, 9, 2, 15, 4, 6, 8, 11]
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=numpy.uint16)
    for d, n in enumerate(lengths, start=1):
        builder.add_document([d] * n + [vocab.eod], [n + 1])
    builder.finalize(str(tmp_path / "docs.idx"))
    seq_length = 16
    packed, _ = build_dataset(
        "indexed", 8, seq_length, vocab, 0, str(tmp_path / "docs"), str(tmp_path / "cache"), pack_documents=True
    )
    plain, _ = build_dataset("indexed", 8, seq_length, vocab, 0, str(tmp_path / "docs"), str(tmp_path / "cache"))
    assert "cu_seqlens" not in plain[0] and plain[0]["loss_mask"].all()
    boundaries_seen = 0
    for i in range(8):
        sample = packed[i]
        tokens = sample["tokens"].tolist()
        assert tokens == plain[i]["tokens"].tolist()
        # Runs of one document id, each closed by its end-of-document token when the sample holds it.
        runs, current = [], 0
        for t in tokens:
            current += 1
            if t == vocab.eod:
                runs.append(current)
                current = 0
        runs += [current] if current else []
        assert sample["cu_seqlens"].tolist() == list(itertools.accumulate([0, *runs]))
        boundaries_seen += len(runs) - 1
        for start, end in itertools.pairwise(sample["cu_seqlens"].tolist()):
            assert len({t for t in tokens[start:end] if t != vocab.eod}) <= 1
        # No loss where an end-of-document token would predict the next document's first token.
        assert sample["loss_mask"].tolist() == [0.0 if t == vocab.eod else 1.0 for t in tokens]
    assert boundaries_seen >= 8


def test_no_loss_across_conversations_even_when_one_opens_with_the_assistant(tmp_path):
    """With a template that renders only the answers, a conversation starts with an assistant token: the
    previous conversation's last token must still not be trained to predict it."""
    tokenizer = tiny_tokenizer()
    answers_only = "{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
    chats = [[{"role": "user", "content": "?"}, {"role": "assistant", "content": "abc"}]] * 3
    conversations = read_conversations(_write_chats(tmp_path / "chats.jsonl", chats))
    (row,) = pack(conversations, ChatRenderer(tokenizer, answers_only), 9, filler=tokenizer.eos_token_id)
    sample = row_sample(row)
    assert sample["cu_seqlens"].tolist() == [0, 3, 6, 9]
    # "a" predicts "b", "b" predicts "c"; "c" ends its conversation.
    assert sample["loss_mask"].tolist() == [1.0, 1.0, 0.0] * 3


@pytest.mark.timeout(300)
def test_sft_run_trains_the_assistant_tokens(tmp_path):
    """examples/pretrain.py --sft-data on the tiny import, every step one global batch of all rows, several
    conversations per row. Step 1's loss (before any update) equals transformers' cross-entropy over the
    assistant tokens of each conversation run alone; after training the same rows' loss is far lower."""
    tokenizer = tiny_tokenizer()
    chats = CHATS * 2
    path = _write_chats(tmp_path / "chats.jsonl", chats)
    seq_length = 64
    rows = pack(read_conversations(path), ChatRenderer(tokenizer), seq_length, filler=tokenizer.eos_token_id)
    assert all(len(row.cu_seqlens) > 3 for row in rows[:-1])  # rows hold several conversations
    imported = imported_tiny(tmp_path, torch.float32)
    history = launch(
        1,
        [
            "--load",
            imported,
            "--sft-data",
            path,
            "--seq-length",
            str(seq_length),
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            str(len(rows)),
            "--train-iters",
            "20",
            "--warmup-iters",
            "2",
            "--lr",
            "3e-3",
        ],
    )

    model = make_tiny_model(TINY, seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in chats:
            ids, assistant = _transformers_rendering(tokenizer, messages)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            trained = torch.tensor(assistant[1:], dtype=torch.bool)
            losses = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(ids[1:]), reduction="none")
            total += losses[trained].sum().item()
            count += int(trained.sum())
    reference = total / count
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"assistant-token loss: transformers {reference:.6f}, step 1 {first:.6f}, step 20 {last:.4f}")
    assert abs(first - reference) <= 1e-5 * reference
    assert last < 0.5 * first


def test_sft_run_at_cp2_matches_one_rank(tmp_path):
    """The same packed chat rows split over two context-parallel ranks (conversations straddle the
    chunk boundary; cu_seqlens stay whole): the logged losses and grad norms of three steps equal one rank's."""
    path = _write_chats(tmp_path / "chats.jsonl", CHATS * 2)
    imported = imported_tiny(tmp_path, torch.float32)
    argv = ["--load", imported, "--sft-data", path, "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--train-iters", "3", "--warmup-iters", "1", "--lr", "3e-3"]
    one_rank, cp2 = launch(1, argv), launch(2, argv + ["--cp", "2"])
    for key in ("loss", "mtp_loss", "grad_norm"):
        for single, split in zip(one_rank, cp2):
            assert abs(split[key] - single[key]) <= 1e-5 * abs(single[key]), (key, one_rank, cp2)

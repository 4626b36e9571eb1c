"""Supervised fine-tuning data: chats from a JSONL file, rendered with the checkpoint's chat template, a
loss on the assistant's tokens only, and whole conversations packed into rows of `seq_length` tokens.

One JSONL line is one conversation: `{"messages": [{"role": "user", "content": "..."}, {"role":
"assistant", "content": "..."}, ...]}`. A row holds whole conversations, each its own document (the
model attends within a document only); the rest of a row is a filler document with no loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy
import torch
from jinja2.exceptions import TemplateError


@dataclass
class Conversation:
    where: str
    """"FILE line N", for errors."""
    messages: list[dict]


def read_conversations(path: str) -> list[Conversation]:
    """Every conversation of a JSONL chat file; a malformed line is an error naming it."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            for i, message in enumerate(messages):
                fields = message if isinstance(message, dict) else {}
                missing = [key for key in ("role", "content") if not isinstance(fields.get(key), str)]
                if missing:
                    raise ValueError(f"{where}: message {i} needs a string {' and '.join(missing)}")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{where}: no assistant message, so nothing to train on; drop the line")
            if messages[0]["role"] == "assistant":
                raise ValueError(
                    f"{where}: the first message is the assistant's, so nothing prompts it; start with "
                    "a system or user message"
                )
            conversations.append(Conversation(where, messages))
    if not conversations:
        raise ValueError(f"{path} holds no conversation")
    return conversations


class ChatRenderer:
    """Token ids of a conversation as the chat template renders it, and which of them the assistant says.

    The assistant's characters are found from the template itself, for any template: those between the
    rendering of the conversation up to an assistant turn with the generation prompt (the prompt the model
    answers) and the rendering through that turn. The template must render a conversation's beginning as
    the beginning of its rendering (DeepSeek's chat mode does; templates that rewrite earlier turns, as
    thinking modes that drop old reasoning do, are refused)."""

    def __init__(self, tokenizer, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.template = chat_template or tokenizer.chat_template
        if self.template is None:
            raise ValueError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template (DeepSeek-V4's "
                "releases ship a Python encoder in encoding/, not a Jinja template); pass --chat-template FILE, "
                "e.g. bridge/deepseek_v4_chat.jinja for DeepSeek-V4's chat mode"
            )

    def _render(self, conversation: Conversation, end: int, add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                conversation.messages[:end],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:
            raise ValueError(f"{conversation.where}: the chat template refused it: {e}") from e

    def render(self, conversation: Conversation) -> tuple[list[int], list[bool]]:
        """(token ids, assistant mask) of one conversation."""
        messages = conversation.messages
        text = self._render(conversation, len(messages))
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(conversation, i, add_generation_prompt=True)
            through = self._render(conversation, i + 1)
            if not (through.startswith(prompt) and text.startswith(through)):
                raise ValueError(
                    f"{conversation.where}: the chat template renders message {i} differently once later "
                    "messages follow, so the assistant's tokens cannot be told apart; use a template that "
                    "renders each turn the same whatever follows (--chat-template FILE)"
                )
            spans.append((len(prompt), len(through)))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(start <= first < end for start, end in spans) for first, _ in encoded["offset_mapping"]]
        return encoded["input_ids"], mask


@dataclass
class PackedRow:
    """One row of `seq_length` tokens and its document boundaries (cumulative lengths from 0)."""

    tokens: list[int]
    assistant: list[bool]
    cu_seqlens: list[int]


def pack(conversations: list[Conversation], renderer: ChatRenderer, seq_length: int, filler: int) -> list[PackedRow]:
    """Whole conversations into rows of `seq_length` tokens, in file order, each row closed when the next
    conversation does not fit; the rest of a row is one filler document (token `filler`, no loss)."""
    rows: list[PackedRow] = []
    current = PackedRow([], [], [0])

    def close():
        used = len(current.tokens)
        if used < seq_length:
            current.tokens.extend([filler] * (seq_length - used))
            current.assistant.extend([False] * (seq_length - used))
            current.cu_seqlens.append(seq_length)
        rows.append(current)

    for conversation in conversations:
        ids, mask = renderer.render(conversation)
        if len(ids) > seq_length:
            raise ValueError(
                f"{conversation.where}: the conversation is {len(ids)} tokens, longer than --seq-length "
                f"{seq_length}; raise --seq-length or shorten or drop the conversation"
            )
        if len(current.tokens) + len(ids) > seq_length:
            close()
            current = PackedRow([], [], [0])
        current.tokens.extend(ids)
        current.assistant.extend(mask)
        current.cu_seqlens.append(len(current.tokens))
    close()
    return rows


def row_sample(row: PackedRow) -> dict[str, torch.Tensor]:
    """The training sample of a row: tokens, labels (the next token), loss_mask (1 where the next token is
    the assistant's and in the same document) and cu_seqlens."""
    tokens = torch.tensor(row.tokens, dtype=torch.int64)
    assistant = torch.tensor(row.assistant, dtype=torch.bool)
    labels = torch.roll(tokens, -1)
    next_is_assistant = torch.roll(assistant, -1)
    last_of_document = torch.zeros_like(assistant)
    last_of_document[torch.tensor(row.cu_seqlens[1:]) - 1] = True
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": (next_is_assistant & ~last_of_document).float(),
        "cu_seqlens": torch.tensor(row.cu_seqlens, dtype=torch.int32),
    }


class SFTDataset:
    """Packed rows as an endless sequence of samples: each pass over the rows in a fresh order, seeded, so
    sample i is the same in every run (and after a resume)."""

    def __init__(self, rows: list[PackedRow], seed: int):
        self.rows = rows
        self.seed = seed
        self._epoch, self._order = None, None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(index, len(self.rows))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, numpy.random.RandomState(self.seed + epoch).permutation(len(self.rows))
        return row_sample(self.rows[self._order[position]])


def split_conversations(conversations: list[Conversation], split: str) -> tuple[list, list]:
    """(train, validation) by Megatron's "train,valid,test" weights, in file order."""
    weights = [float(w) for w in split.split(",")]
    total = sum(weights)
    train_end = round(len(conversations) * weights[0] / total)
    valid_end = train_end + round(len(conversations) * weights[1] / total)
    return conversations[:train_end], conversations[train_end:valid_end]

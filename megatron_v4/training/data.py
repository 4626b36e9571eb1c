"""Training data: Megatron-Core's `GPTDataset` over an indexed (.bin/.idx) dataset, a text/JSONL file
tokenised into one, or `MockGPTDataset`; batches are drawn in a fixed order from a sample counter, so a
resumed run sees the same data. With `pack_documents` the end-of-document tokens inside a sample divide it
into documents (`cu_seqlens`), which the model keeps apart."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch
import torch.distributed as dist
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


class VocabTokenizer:
    """What Megatron's datasets need of a tokenizer for prepared or mock data: the vocabulary size, the
    end-of-document token (the last one here) and identifiers for their cache of sample indices."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_size": self.vocab_size, "eod": self.eod}


class ByteTokenizer(VocabTokenizer):
    """UTF-8 bytes as tokens 0..255 and an end-of-document token 256: needs nothing on disk."""

    def __init__(self):
        super().__init__(vocab_size=257)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer(VocabTokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json and friends); its eos token ends documents."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self.path = os.path.abspath(path)
        self.vocab_size = len(self._tokenizer)
        self.eod = self._tokenizer.eos_token_id
        if self.eod is None:
            raise ValueError(f"the tokenizer in {path} has no eos token; set eos_token in its tokenizer_config.json")

    @property
    def unique_identifiers(self) -> dict:
        return {**super().unique_identifiers, "path": self.path}

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _documents(path: str) -> Iterator[str]:
    """A JSONL file's "text" fields, or a plain text file's paragraphs (split on blank lines)."""
    with open(path, encoding="utf-8") as f:
        if path.endswith((".jsonl", ".json")):
            for line in f:
                if line.strip():
                    yield json.loads(line)["text"]
        else:
            for paragraph in f.read().split("\n\n"):
                if paragraph.strip():
                    yield paragraph


def tokenise_to_indexed(text_path: str, tokenizer, out_prefix: str) -> str:
    """Tokenise a text/JSONL file into a Megatron indexed dataset `out_prefix`.bin/.idx (rank 0 writes)."""
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
        dtype = numpy.uint16 if tokenizer.vocab_size <= 65536 else numpy.int32
        builder = IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype)
        for text in _documents(text_path):
            ids = tokenizer.encode(text) + [tokenizer.eod]
            builder.add_document(ids, [len(ids)])
        builder.finalize(out_prefix + ".idx")
        if not builder.sequence_lengths or not sum(builder.sequence_lengths):
            raise ValueError(f"{text_path} holds no text (JSONL needs a 'text' field per line)")
    dist.barrier()
    return out_prefix


def build_dataset(
    kind: str,
    num_samples: int,
    seq_length: int,
    tokenizer,
    seed: int,
    data_prefix: str | None = None,
    cache_dir: str | None = None,
    split: str = "100,0,0",
    valid_samples: int = 0,
    pack_documents: bool = False,
) -> tuple[GPTDataset, GPTDataset | None]:
    """(train, validation) `GPTDataset`s (kind "indexed" or "mock") of at least `num_samples` and
    `valid_samples` samples of seq_length + 1 tokens. An indexed dataset's documents are divided by
    `split` (Megatron's "train,valid,test" weights); mock validation data is a differently seeded mock set.
    The validation set is None when `valid_samples` is 0. With `pack_documents` each sample also has its
    documents' boundaries (`DocumentBoundaries`) and no loss where an end-of-document token would predict
    the next document's first token (Megatron's `eod_mask_loss`)."""

    def config(random_seed: int) -> GPTDatasetConfig:
        return GPTDatasetConfig(
            random_seed=random_seed,
            sequence_length=seq_length,
            blend=([data_prefix], None) if kind == "indexed" else None,
            split=split if kind == "indexed" else "100,0,0",
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=pack_documents,
            create_attention_mask=False,
            path_to_cache=cache_dir,
        )

    if kind == "mock":
        train, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [num_samples, 0, 0], lambda: True, config(seed)).build()
        valid = None
        if valid_samples:
            valid, _, _ = BlendedMegatronDatasetBuilder(
                MockGPTDataset, [valid_samples, 0, 0], lambda: True, config(seed + 1)
            ).build()
    else:
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [num_samples, valid_samples, 0], lambda: True, config(seed)
        ).build()
        valid = valid if valid_samples else None
    if pack_documents:
        train, valid = (None if d is None else DocumentBoundaries(d, tokenizer.eod) for d in (train, valid))
    return train, valid


def eod_boundaries(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """cu_seqlens of a sample whose documents each end with the end-of-document token: 0, the position
    after every such token, and the sample length."""
    ends = (torch.nonzero(tokens == eod).flatten() + 1).tolist()
    return torch.tensor([0, *(e for e in ends if e < len(tokens)), len(tokens)], dtype=torch.int32)


class DocumentBoundaries:
    """A `GPTDataset` whose samples also carry `cu_seqlens`, their documents' boundaries."""

    def __init__(self, dataset: GPTDataset, eod: int):
        self.dataset = dataset
        self.eod = eod

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        return {**sample, "cu_seqlens": eod_boundaries(torch.as_tensor(sample["tokens"]), self.eod)}


@dataclass
class DataOrder:
    """Which samples a rank reads: global batch `step` holds samples [step * global_batch, ...), split in
    micro batches, each split over the data-parallel ranks (as Megatron's pretraining sampler does)."""

    micro_batch_size: int
    num_microbatches: int
    dp_rank: int
    dp_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_microbatches * self.dp_size

    def micro_batches(self, dataset, step: int) -> Iterator[dict[str, torch.Tensor]]:
        first = step * self.global_batch_size
        for m in range(self.num_microbatches):
            start = first + (m * self.dp_size + self.dp_rank) * self.micro_batch_size
            samples = [dataset[i] for i in range(start, start + self.micro_batch_size)]
            # Packed samples carry cu_seqlens, one row per micro batch (Megatron-Core's THD format).
            keys = [key for key in ("tokens", "labels", "loss_mask", "cu_seqlens") if key in samples[0]]
            yield {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in keys}

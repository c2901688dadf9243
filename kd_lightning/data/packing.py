"""Token ids -> fixed-length causal-LM samples (Hugging Face label convention).

Every sample is a row of ``seq_len`` ids, right-padded, described by two numbers: ``length`` (real
tokens) and ``prompt_length`` (leading tokens that are context only). From those the dataset
derives, per item:
- ``input_ids``      LongTensor [L]
- ``attention_mask`` LongTensor [L]  1 on the first ``length`` positions, 0 on padding
- ``labels``         LongTensor [L]  unshifted: ``input_ids`` where counted, -100 on prompt and padding
- ``prompt_lengths`` LongTensor []   so that on-policy generation can recover the prompt
- ``index``          LongTensor []   the sample's row in its split (the teacher store keys rows by
  their tokens instead: `kd_lightning.teachers.store.row_keys`)
The training module does the causal shift.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from typing_extensions import override

from kd_lightning.tasks import IGNORE_INDEX


class LMDataset(Dataset):
    """Rows of token ids with their real length and prompt length; masks are derived per item."""

    def __init__(self, input_ids: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray) -> None:
        # int32 storage halves memory; items are returned as int64 (what embeddings and CE expect).
        self.input_ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int32))  # [N, L]
        self.lengths = torch.from_numpy(np.asarray(lengths, dtype=np.int64))  # [N]
        self.prompt_lengths = torch.from_numpy(np.asarray(prompt_lengths, dtype=np.int64))  # [N]
        self.positions = torch.arange(self.input_ids.shape[1])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @override
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.input_ids[index].long()
        length, prompt_length = self.lengths[index], self.prompt_lengths[index]
        real = self.positions < length
        counted = real & (self.positions >= prompt_length)
        return {
            "input_ids": input_ids,
            "attention_mask": real.long(),
            "labels": input_ids.masked_fill(~counted, IGNORE_INDEX),
            "prompt_lengths": prompt_length,
            "index": torch.tensor(int(index), dtype=torch.long),
        }

    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the dataset."""
        return int(self.lengths.sum())


def pack_documents(
    documents: Iterable[np.ndarray], eos_id: int, pad_id: int, seq_len: int, max_tokens: int | None = None
) -> LMDataset:
    """Documents joined with EOS into one stream, cut into non-overlapping ``seq_len`` windows.

    Whole documents are taken in the given order until ``max_tokens`` is reached, and the stream
    is cut at ``max_tokens``. A final partial window is kept, right-padded (masked), so that a
    small split still yields a sample.
    """
    chunks: list[np.ndarray] = []
    total = 0
    separator = np.asarray([eos_id], dtype=np.int32)
    for document in documents:
        chunks += [np.asarray(document, dtype=np.int32), separator]
        total += len(document) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    num_windows = -(-len(stream) // seq_len)
    padded = np.full(num_windows * seq_len, pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    lengths = np.full(num_windows, seq_len, dtype=np.int64)
    if num_windows and len(stream) % seq_len:
        lengths[-1] = len(stream) % seq_len
    return LMDataset(padded.reshape(num_windows, seq_len), lengths, np.zeros(num_windows, dtype=np.int64))


def encode_pairs(
    prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], eos_id: int, pad_id: int, seq_len: int
) -> LMDataset:
    """One sample per (prompt, response): ``prompt + response + EOS``, truncated and right-padded.

    Truncation keeps the end of the prompt (the part next to the response) and gives the response
    at least ``seq_len // 2`` tokens when it is that long; a response longer than its budget loses
    its end (and its EOS).
    """
    input_ids = np.full((len(prompts), seq_len), pad_id, dtype=np.int32)
    lengths = np.zeros(len(prompts), dtype=np.int64)
    prompt_lengths = np.zeros(len(prompts), dtype=np.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        target = np.append(np.asarray(response, dtype=np.int32), np.int32(eos_id))
        response_budget = min(len(target), max(seq_len - len(prompt), seq_len // 2))
        prompt_budget = min(len(prompt), seq_len - response_budget)
        kept_prompt = prompt[len(prompt) - prompt_budget :]
        sample = np.concatenate([np.asarray(kept_prompt, dtype=np.int32), target[:response_budget]])
        input_ids[row, : len(sample)] = sample
        lengths[row] = len(sample)
        prompt_lengths[row] = prompt_budget
    return LMDataset(input_ids, lengths, prompt_lengths)

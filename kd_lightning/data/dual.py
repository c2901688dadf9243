"""Two tokenizations of the same text per sample: the student's and the teacher's.

A teacher must only ever see its own tokenizer's ids, so cross-tokenizer distillation needs both
tokenizations of each sample plus where every token sits in the text. Per sample (unshifted, HF
label convention; the module does the causal shift on both sides):

- ``input_ids``, ``attention_mask``, ``labels``          LongTensor [Ls]      student side
- ``offsets``                                            LongTensor [Ls, 2]   character spans
- ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``   LongTensor [Lt]
- ``teacher_offsets``                                    LongTensor [Lt, 2]

**Offsets are in characters** (Python ``str`` indices) on both sides, the unit fast tokenizers
report; for the byte tokenizer they are computed here, each byte carrying the span of the character
it belongs to (so the 3 bytes of "€" all get ``(k, k + 1)``). EOS gets the zero-width span
``(n, n)`` at the end of its document; padding gets ``(-1, -1)``. Offsets are relative to the
window's own text (the first token of a window starts at 0 or near it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from typing_extensions import override

from kd_lightning.data.packing import IGNORE_INDEX
from kd_lightning.data.tokenizer import encode_bytes, eos_id, is_byte_tokenizer, pad_id
from kd_lightning.losses.align import token_cuts

Encoded = tuple[np.ndarray, np.ndarray]  # ids [L] int64, offsets [L, 2] int64


def encode_with_offsets(tokenizer: Any, text: str) -> Encoded:
    """Token ids (no special tokens) of ``text`` and their character spans ``[L, 2]``."""
    if is_byte_tokenizer(tokenizer):
        data = text.encode("utf-8")
        raw = np.frombuffer(data, dtype=np.uint8)
        # A UTF-8 continuation byte is 0b10xxxxxx: every other byte starts a character.
        char_index = np.cumsum((raw & 0xC0) != 0x80) - 1
        offsets = np.stack([char_index, char_index + 1], axis=1).astype(np.int64)
        return encode_bytes(data).astype(np.int64), offsets.reshape(-1, 2)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')!r}) reports no "
            "offsets; cross-tokenizer data needs a fast tokenizer or the byte tokenizer"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, offsets


def encode_document(tokenizer: Any, text: str, prompt_chars: int = 0, add_eos: bool = True) -> tuple[Encoded, int]:
    """``text`` encoded with EOS appended at ``(n, n)``; returns ``((ids, offsets), prompt_tokens)``.

    With ``prompt_chars > 0`` the prompt ``text[:prompt_chars]`` and the response are encoded
    separately and joined, so the split is a token boundary in every tokenization (the same choice
    as ``encode_pairs`` for one tokenizer); ``prompt_tokens`` counts the prompt's tokens.
    """
    if not 0 <= prompt_chars <= len(text):
        raise ValueError(f"prompt_chars={prompt_chars} outside the text (length {len(text)})")
    parts = [text[:prompt_chars], text[prompt_chars:]] if prompt_chars else [text]
    ids, offsets, start = [], [], 0
    for part in parts:
        part_ids, part_offsets = encode_with_offsets(tokenizer, part)
        ids.append(part_ids)
        offsets.append(part_offsets + start)
        start += len(part)
    prompt_tokens = len(ids[0]) if prompt_chars else 0
    if add_eos:
        ids.append(np.asarray([eos_id(tokenizer)], dtype=np.int64))
        offsets.append(np.asarray([[len(text), len(text)]], dtype=np.int64))
    return (np.concatenate(ids), np.concatenate(offsets).reshape(-1, 2)), prompt_tokens


def shared_windows(
    student_offsets: np.ndarray, teacher_offsets: np.ndarray, seq_len: int
) -> list[tuple[int, int, int, int]]:
    """Cut two tokenizations of one text into windows of at most ``seq_len`` tokens on each side.

    Returns ``(student_start, student_end, teacher_start, teacher_end)`` token ranges; every cut is a
    character offset that is a token boundary in both tokenizations (see
    :func:`~kd_lightning.losses.align.token_cuts`), so both sides of a window cover exactly the same
    text. Greedy: each window ends at the furthest shared boundary that fits. A stretch between two
    consecutive shared boundaries longer than ``seq_len`` on either side (very rare: a huge run
    without a common boundary) cannot be cut in both and is skipped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    # One cut per character offset and side: the last (a zero-width EOS joins the window before it).
    student, teacher = dict(token_cuts(student_offsets)), dict(token_cuts(teacher_offsets))
    shared = [(student[char], teacher[char]) for char in sorted(student.keys() & teacher.keys())]
    windows = []
    position = 0
    while position < len(shared) - 1:
        s0, t0 = shared[position]
        furthest = position
        while (furthest + 1 < len(shared) and shared[furthest + 1][0] - s0 <= seq_len
               and shared[furthest + 1][1] - t0 <= seq_len):
            furthest += 1
        if furthest == position:
            position += 1  # an uncuttable stretch: skip it
            continue
        s1, t1 = shared[furthest]
        windows.append((s0, s1, t0, t1))
        position = furthest
    return windows


def _side(ids: np.ndarray, offsets: np.ndarray, counted_from: int, char_start: int) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(ids.copy())
    labels = input_ids.clone()
    labels[:counted_from] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "offsets": torch.from_numpy(offsets - char_start)}


def dual_samples(
    text: str, student_tokenizer: Any, teacher_tokenizer: Any, seq_len: int, prompt_chars: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Samples (keys in the module docstring) covering ``text`` in windows of at most ``seq_len`` tokens.

    Prompt tokens (the first ``prompt_chars`` characters) are labelled -100 on both sides. A
    prompt/response text longer than ``seq_len`` is windowed like any text (later windows are
    all response); callers wanting one sample per pair keep texts short.
    """
    (s_ids, s_off), s_prompt = encode_document(student_tokenizer, text, prompt_chars)
    (t_ids, t_off), t_prompt = encode_document(teacher_tokenizer, text, prompt_chars)
    samples = []
    for s0, s1, t0, t1 in shared_windows(s_off, t_off, seq_len):
        char_start = int(s_off[s0, 0])
        student = _side(s_ids[s0:s1], s_off[s0:s1], max(s_prompt - s0, 0), char_start)
        teacher = _side(t_ids[t0:t1], t_off[t0:t1], max(t_prompt - t0, 0), char_start)
        samples.append({**student, **{f"teacher_{key}": value for key, value in teacher.items()}})
    return samples


class DualTextDataset(Dataset):
    """Windows of ``texts`` (optionally ``(prompt, response)`` pairs) in both tokenizations.

    ``max_tokens`` caps the stream: texts are read in order and windows kept until they hold that many
    tokens of the longer tokenization (so a byte/BPE pair covers the same text as a byte-level run with the
    same cap); ``texts`` may be a lazy iterable, read only that far.
    """

    def __init__(self, texts: Iterable[str | tuple[str, str]], student_tokenizer: Any, teacher_tokenizer: Any,
                 seq_len: int, max_tokens: int | None = None) -> None:
        self.samples: list[dict[str, torch.Tensor]] = []
        total = 0
        for item in texts:
            if max_tokens is not None and total >= max_tokens:
                break
            text, prompt_chars = (item[0] + item[1], len(item[0])) if isinstance(item, tuple) else (item, 0)
            for sample in dual_samples(text, student_tokenizer, teacher_tokenizer, seq_len, prompt_chars):
                if max_tokens is not None and total >= max_tokens:
                    break
                self.samples.append(sample)
                total += max(len(sample["input_ids"]), len(sample["teacher_input_ids"]))

    def __len__(self) -> int:
        return len(self.samples)

    @override
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "offsets": -1}


@dataclass(frozen=True)
class DualCollator:
    """Right-pads each side of a list of dual samples to its own longest sequence.

    ``input_ids`` get the side's pad id, ``attention_mask`` 0, ``labels`` -100, ``offsets`` -1; other
    keys (scalars) are stacked. Build with :meth:`for_tokenizers`.
    """

    student_pad_id: int
    teacher_pad_id: int

    @classmethod
    def for_tokenizers(cls, student_tokenizer: Any, teacher_tokenizer: Any) -> DualCollator:
        return cls(pad_id(student_tokenizer), pad_id(teacher_tokenizer))

    def __call__(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if values[0].ndim == 0:
                batch[key] = torch.stack(values)
                continue
            base = key.removeprefix("teacher_")
            pad = PAD_VALUES.get(base, self.teacher_pad_id if key.startswith("teacher_") else self.student_pad_id)
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
        return batch

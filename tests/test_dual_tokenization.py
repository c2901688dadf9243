"""Two tokenizations of one text: offsets, prompt masks, shared-boundary windows, collate."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.bpe import train_bpe
from kd_lightning.data.dual import (
    DualCollator,
    DualTextDataset,
    dual_samples,
    encode_document,
    encode_with_offsets,
    shared_windows,
)
from kd_lightning.data.tokenizer import byte_tokenizer

SAMPLE = ["def area(radius):\n    return 3.14 * radius ** 2  # café €\n", "print(area(2))\n"] * 20
TEXT = "def naïve(x):\n    return x * 2  # €😀 ok\n" * 3


@pytest.fixture(scope="module")
def small_bpe():
    return train_bpe(SAMPLE, 300)


@pytest.fixture(scope="module")
def large_bpe():
    return train_bpe(SAMPLE, 420)


def window_text(sample, prefix=""):
    """The window's text from its own ids and offsets (characters, relative to the window)."""
    offsets = sample[f"{prefix}offsets"]
    return int(offsets[:, 0].min()), int(offsets[:, 1].max())


def test_byte_offsets_are_characters():
    ids, offsets = encode_with_offsets(byte_tokenizer(), "a€b")
    assert ids.tolist() == [ord("a") + 3, 0xE2 + 3, 0x82 + 3, 0xAC + 3, ord("b") + 3]
    assert offsets.tolist() == [[0, 1], [1, 2], [1, 2], [1, 2], [2, 3]]


def test_encode_document_adds_zero_width_eos_and_splits_at_the_prompt(small_bpe):
    for tokenizer in (byte_tokenizer(), small_bpe):
        (ids, offsets), prompt_tokens = encode_document(tokenizer, "ab cd", prompt_chars=2)
        assert ids[-1] == tokenizer.eos_token_id and offsets[-1].tolist() == [5, 5]
        assert offsets[prompt_tokens - 1][1] == 2 and offsets[prompt_tokens][0] == 2
    with pytest.raises(ValueError, match="prompt_chars"):
        encode_document(byte_tokenizer(), "ab", prompt_chars=3)


def test_slow_tokenizer_without_offsets_is_rejected():
    class Slow:
        is_fast = False
        name_or_path = "slow"

    with pytest.raises(ValueError, match="fast tokenizer"):
        encode_with_offsets(Slow(), "x")


@pytest.mark.parametrize("seq_len", [4, 9, 64])
def test_windows_share_boundaries_and_fit(small_bpe, large_bpe, seq_len):
    for student_tok, teacher_tok in ((byte_tokenizer(), large_bpe), (small_bpe, large_bpe)):
        samples = dual_samples(TEXT, student_tok, teacher_tok, seq_len)
        position, pieces = 0, []
        for sample in samples:
            assert 0 < len(sample["input_ids"]) <= seq_len and 0 < len(sample["teacher_input_ids"]) <= seq_len
            student_span, teacher_span = window_text(sample), window_text(sample, "teacher_")
            assert student_span == teacher_span  # both sides cover the same characters
            assert sample["offsets"][0, 0] == 0 == sample["teacher_offsets"][0, 0]
            decoded = [
                tokenizer.decode([i for i in sample[f"{prefix}input_ids"].tolist() if i != tokenizer.eos_token_id])
                for tokenizer, prefix in ((student_tok, ""), (teacher_tok, "teacher_"))
            ]
            assert decoded[0] == decoded[1] and len(decoded[0]) == student_span[1]
            found = TEXT.find(decoded[0], position)
            assert found >= position
            pieces.append(decoded[0])
            position = found + len(decoded[0])
        if seq_len >= 9:
            assert "".join(pieces) == TEXT  # nothing skipped at these sizes
        assert samples[-1]["input_ids"][-1] == student_tok.eos_token_id
        assert samples[-1]["teacher_input_ids"][-1] == teacher_tok.eos_token_id


def test_uncuttable_stretch_is_skipped():
    # Student: one token over the whole text; teacher: four tokens. No window of 2 fits the teacher.
    assert shared_windows([[0, 4]], [[0, 1], [1, 2], [2, 3], [3, 4]], 2) == []
    assert shared_windows([[0, 2], [2, 4]], [[0, 1], [1, 2], [2, 3], [3, 4]], 2) == [(0, 1, 0, 2), (1, 2, 2, 4)]
    with pytest.raises(ValueError, match="seq_len"):
        shared_windows([[0, 1]], [[0, 1]], 0)


def test_prompt_tokens_are_masked_on_both_sides(large_bpe):
    prompt, response = "Q: what is 2 * 3?\n", "A: 6, naïvely.\n"
    (sample,) = dual_samples(prompt + response, byte_tokenizer(), large_bpe, 256, prompt_chars=len(prompt))
    for prefix in ("", "teacher_"):
        offsets, labels = sample[f"{prefix}offsets"], sample[f"{prefix}labels"]
        in_prompt = offsets[:, 1] <= len(prompt)
        in_prompt[-1] = False  # EOS at (n, n) belongs to the response
        assert (labels[in_prompt] == -100).all() and (labels[~in_prompt] != -100).all()
        assert (offsets[~in_prompt, 0] >= len(prompt)).all()


def test_collate_pads_each_side_independently(large_bpe):
    dataset = DualTextDataset(["short", ("Q: long prompt ", "and answer " * 3)], byte_tokenizer(), large_bpe, 64)
    batch = DualCollator.for_tokenizers(byte_tokenizer(), large_bpe)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[1] == max(len(dataset[i]["input_ids"]) for i in range(2))
    assert batch["teacher_input_ids"].shape[1] == max(len(dataset[i]["teacher_input_ids"]) for i in range(2))
    assert batch["input_ids"].shape[1] != batch["teacher_input_ids"].shape[1]
    short = len(dataset[0]["input_ids"])
    assert (batch["input_ids"][0, short:] == 0).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["labels"][0, short:] == -100).all() and (batch["offsets"][0, short:] == -1).all()
    teacher_short = len(dataset[0]["teacher_input_ids"])
    assert (batch["teacher_input_ids"][0, teacher_short:] == large_bpe.pad_token_id).all()
    assert batch["offsets"].shape[-1] == 2 and batch["offsets"].dtype == torch.long

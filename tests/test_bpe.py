"""Offline byte-level BPE: round trip, offsets, special ids, cache on disk."""

from __future__ import annotations

import pytest

from kd_lightning.data.bpe import cached_bpe_tokenizer, train_bpe
from kd_lightning.data.vocab_map import token_bytes

SAMPLE = [
    "def area(radius):\n    return 3.14159 * radius ** 2  # café\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for index, value in enumerate(values):\n\tprint(index, value)  # ü €\n",
] * 20
TRICKY = "déf  naïve(ü):\n\treturn '€😀'  \r\n  x\u00a0=\u3000'日本'"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(SAMPLE, 400)


def test_specials_vocab_and_round_trip(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 259 < len(tokenizer) <= 400
    for text in SAMPLE[:3] + [TRICKY, "", " ", "\n\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    merged = tokenizer("    return", add_special_tokens=False)["input_ids"]
    assert len(merged) < len("    return")  # merges were learned


def test_offsets_tile_the_text(tokenizer):
    encoded = tokenizer(TRICKY, add_special_tokens=False, return_offsets_mapping=True)
    by_id = token_bytes(tokenizer)
    pieces = b"".join(by_id[i] for i in encoded["input_ids"])
    assert pieces == TRICKY.encode("utf-8")
    previous_start = previous_end = 0
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        # A token lies inside its character span; partial characters share the whole character's span.
        assert by_id[token_id] in TRICKY[start:end].encode("utf-8")
        assert start >= previous_end or (start, end) == (previous_start, previous_end)
        previous_start, previous_end = start, end
    assert previous_end == len(TRICKY)


def test_cache_trains_once_and_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    calls = []

    def texts():
        calls.append(1)
        return iter(SAMPLE)

    first = cached_bpe_tokenizer(tmp_path, "corpus-v1", texts, 300)
    second = cached_bpe_tokenizer(tmp_path, "corpus-v1", texts, 300)
    assert len(calls) == 1
    assert first.get_vocab() == second.get_vocab()
    directories = [p for p in tmp_path.iterdir()]
    assert len(directories) == 1 and directories[0].name.startswith("bpe-300-")  # no staging left behind
    loaded = AutoTokenizer.from_pretrained(directories[0])
    assert loaded(TRICKY)["input_ids"] == first(TRICKY)["input_ids"]
    cached_bpe_tokenizer(tmp_path, "corpus-v2", texts, 300)  # another corpus: another key
    assert len(calls) == 2


def test_save_pretrained_next_to_a_student(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "student")
    assert AutoTokenizer.from_pretrained(tmp_path / "student").decode(tokenizer(TRICKY)["input_ids"]) == TRICKY


def test_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe(SAMPLE, 100)


@pytest.mark.slow
def test_stdlib_bpe_is_trained_on_the_training_split_and_cached(tmp_path):
    from kd_lightning.data.stdlib import stdlib_bpe_tokenizer

    tokenizer = stdlib_bpe_tokenizer(tmp_path, 4096)
    assert len(tokenizer) == 4096
    text = "def __init__(self, *args, **kwargs):\n        super().__init__()\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) < len(text) / 3
    assert stdlib_bpe_tokenizer(tmp_path, 4096).get_vocab() == tokenizer.get_vocab()
    assert len(list(tmp_path.iterdir())) == 1

"""Character-span groups between two tokenizations and the shared-vocabulary map."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data.bpe import train_bpe
from kd_lightning.data.tokenizer import byte_tokenizer
from kd_lightning.data import vocab_map
from kd_lightning.data.vocab_map import shared_vocab_map
from kd_lightning.losses.align import SpanGroup, VocabMap, span_groups, token_cuts

SAMPLE = ["def area(radius):\n    return 3.14 * radius ** 2  # café €\n", "print(area(2))\n"] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(SAMPLE, 320)


def test_token_cuts_skip_inside_characters_and_repeat_at_zero_width_tokens():
    # "a€" + EOS in bytes: a, then three bytes of €, then EOS.
    offsets = [(0, 1), (1, 2), (1, 2), (1, 2), (2, 2)]
    assert token_cuts(offsets) == [(0, 0), (1, 1), (2, 4), (2, 5)]
    assert token_cuts([(3, 5), (5, 6), (-1, -1)]) == [(3, 0), (5, 1), (6, 2)]  # padding ends the sequence
    assert token_cuts([]) == []


def test_span_groups_by_hand():
    # text "def foo" ; student: "def", " foo" ; teacher: "d", "ef", " ", "foo", EOS at (7, 7) on both.
    student = [(0, 3), (3, 7), (7, 7)]
    teacher = [(0, 1), (1, 3), (3, 4), (4, 7), (7, 7)]
    assert span_groups(student, teacher) == [
        SpanGroup(0, 1, 0, 2, 0, 3), SpanGroup(1, 2, 2, 4, 3, 7), SpanGroup(2, 3, 4, 5, 7, 7),
    ]
    # After a causal shift the first targets may start at different characters: earlier tokens drop out.
    assert span_groups([(3, 7), (7, 7)], [(1, 3), (3, 4), (4, 7), (7, 7)]) == [
        SpanGroup(0, 1, 1, 3, 3, 7), SpanGroup(1, 2, 3, 4, 7, 7),
    ]


def test_identical_tokenizations_give_one_to_one_groups():
    offsets = torch.tensor([[0, 2], [2, 3], [3, 3], [-1, -1]])
    groups = span_groups(offsets, offsets)
    assert [g.one_to_one for g in groups] == [True] * 3
    assert [(g.student_start, g.teacher_start) for g in groups] == [(0, 0), (1, 1), (2, 2)]


def test_groups_cover_the_same_text_on_real_tokenizers(bpe):
    from kd_lightning.data.dual import encode_document

    text = "x = naïve('€😀')  # ok\n\tdone"
    (_, student), _ = encode_document(byte_tokenizer(), text)
    (_, teacher), _ = encode_document(bpe, text)
    groups = span_groups(student, teacher)
    assert groups[0].char_start == 0 and groups[-1].char_end == len(text)
    for group in groups:
        assert student[group.student_start][0] == teacher[group.teacher_start][0] == group.char_start
        assert max(student[group.student_end - 1][1], 0) == max(teacher[group.teacher_end - 1][1], 0) == group.char_end
    assert sum(g.student_end - g.student_start for g in groups) == len(student)
    assert sum(g.teacher_end - g.teacher_start for g in groups) == len(teacher)


def test_vocab_map_between_bytes_and_bpe(bpe):
    mapping = shared_vocab_map(byte_tokenizer(), bpe)
    by_student = dict(zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist()))
    assert by_student[1] == bpe.eos_token_id  # EOS matches EOS by role
    space_byte = ord(" ") + 3
    assert bpe.convert_ids_to_tokens(by_student[space_byte]) == "Ġ"  # byte-level spelling normalised
    assert len(mapping.student_ids) == 257  # every byte and EOS; pad/unk left out
    assert mapping.lookup(259)[space_byte] >= 0 and mapping.lookup(259)[0] == -1


def test_vocab_map_of_a_tokenizer_with_itself_is_the_identity(bpe):
    mapping = shared_vocab_map(bpe, bpe)
    assert torch.equal(mapping.student_ids, mapping.teacher_ids)
    assert set(range(3, len(bpe))) <= set(mapping.student_ids.tolist())


def test_vocab_map_is_cached_in_memory_and_on_disk(bpe, tmp_path, monkeypatch):
    first = shared_vocab_map(byte_tokenizer(), bpe, cache_dir=str(tmp_path))
    assert shared_vocab_map(byte_tokenizer(), bpe) is first
    monkeypatch.setattr(vocab_map, "_VOCAB_MAPS", {})
    monkeypatch.setattr(vocab_map, "token_bytes", lambda tokenizer: pytest.fail("rebuilt instead of loaded"))
    loaded = shared_vocab_map(byte_tokenizer(), bpe, cache_dir=str(tmp_path))
    assert isinstance(loaded, VocabMap) and torch.equal(loaded.student_ids, first.student_ids)
    assert len(list(tmp_path.glob("vocab-map-*.pt"))) == 1


def test_vocab_map_normalises_sentencepiece_spaces(bpe):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    backend.train_from_iterator(SAMPLE, trainer)
    metaspace = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    mapping = shared_vocab_map(metaspace, bpe)
    pairs = {metaspace.convert_ids_to_tokens(s): bpe.convert_ids_to_tokens(t)
             for s, t in zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist())}
    assert pairs["▁radius"] == "Ġradius" and pairs["</s>"] == "</s>"


def llama_style_tokenizer(texts, vocab_size):
    """SentencePiece spelling as Llama/Mistral ship it in tokenizer.json: Metaspace words, byte
    fallback ``<0xNN>`` tokens and a Replace/ByteFallback/Fuse/Strip decoder (no Metaspace decoder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_normalised_matching_finds_more_common_tokens_and_maps_them_right(bpe):
    from kd_lightning.data.vocab_map import build_vocab_map, token_bytes

    text = SAMPLE + ["The naïve café served crème brûlée to the radius area 😀\n"] * 10
    llama = llama_style_tokenizer(text, 420)
    raw = build_vocab_map(llama, bpe, normalise=False)
    normalised = build_vocab_map(llama, bpe)
    assert len(normalised.student_ids) > len(raw.student_ids) + 20  # words with a leading space, bytes
    pairs = {llama.convert_ids_to_tokens(s): bpe.convert_ids_to_tokens(t)
             for s, t in zip(normalised.student_ids.tolist(), normalised.teacher_ids.tolist())}
    assert pairs["\u2581radius"] == "\u0120radius" and pairs["<0x0A>"] == "\u010a" and pairs["</s>"] == "</s>"
    assert pairs["<0xC3>"] == "\u00c3"  # a byte-fallback byte is the byte-level token of that byte
    llama_bytes, bpe_bytes = token_bytes(llama), token_bytes(bpe)
    for s, t in zip(normalised.student_ids.tolist(), normalised.teacher_ids.tolist()):
        assert llama_bytes[s] == bpe_bytes[t]
        if llama_bytes[s] not in (b"<eos>", b"<bos>"):  # the two decode to the same text
            assert bpe.decode([t]).encode("utf-8", "replace") == bpe_bytes[t] or bpe_bytes[t][-1] >= 0x80
            assert llama.convert_tokens_to_string(["a", llama.convert_ids_to_tokens(s)]) == \
                "a" + bpe_bytes[t].decode("utf-8", "replace") or bpe_bytes[t][-1] >= 0x80


def test_a_damaged_vocab_map_file_is_rebuilt_and_rewritten(bpe, tmp_path, monkeypatch, caplog):
    first = shared_vocab_map(byte_tokenizer(), bpe, cache_dir=str(tmp_path))
    (path,) = tmp_path.glob("vocab-map-*.pt")
    path.write_bytes(path.read_bytes()[:20])  # a copy that stopped half-way
    monkeypatch.setattr(vocab_map, "_VOCAB_MAPS", {})
    with caplog.at_level("WARNING", logger="kd_lightning"):
        rebuilt = shared_vocab_map(byte_tokenizer(), bpe, cache_dir=str(tmp_path))
    assert "unreadable vocabulary map" in caplog.text and torch.equal(rebuilt.student_ids, first.student_ids)
    student_ids, _ = torch.load(path, weights_only=True)  # rewritten whole, and weights-only loadable
    assert torch.equal(student_ids, first.student_ids)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind

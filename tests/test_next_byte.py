"""Exact next-byte targets (loss=byte_kl): toy-tokenizer enumeration, identity with plain forward KL."""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L
from kd_lightning.data.tokenizer import byte_tokenizer
from kd_lightning.data.vocab_map import build_next_byte_map
from kd_lightning.losses.cross_vocab import CrossTokenTargets


class ToyTokenizer:
    """A vocabulary of byte strings (ids 0 pad, 1 eos, 2 unk), enough for token_bytes."""

    def __init__(self, pieces: list[str]) -> None:
        self.vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{p: i + 3 for i, p in enumerate(pieces)}}
        self.eos_token_id, self.bos_token_id, self.all_special_ids = 1, None, [0, 1, 2]

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


PIECES = ["a", "b", "c", "ab", "abc", "ba", "bca", "ca", "cab", "abca"]
TOY = ToyTokenizer(PIECES)
NEXT = build_next_byte_map(byte_tokenizer(), TOY)


def brute_force(probs: list[float], prefix: bytes) -> list[float]:
    """P(next byte | prefix) by enumerating the vocabulary."""
    strings = {i: p.encode() for p, i in TOY.vocab.items() if i > 2}
    out = [0.0] * 257
    for token_id, value in strings.items():
        if len(value) > len(prefix) and value.startswith(prefix):
            out[value[len(prefix)]] += probs[token_id]
    if not prefix:
        out[256] += probs[1]
    total = sum(out)
    return [v / total for v in out]


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"b", b"bc", b"c", b"ca"])
def test_next_byte_marginal_sums_to_one_and_equals_enumeration(prefix):
    gen = torch.Generator().manual_seed(len(prefix))
    logits = torch.randn(1, len(TOY), generator=gen, dtype=torch.float64) * 2
    token = TOY.vocab[next(p for p in ["a", "b", "c", "abca", "abc", "bca", "cab"] if p.encode().startswith(prefix)
                           and len(p) > len(prefix))]
    node = NEXT.prefix_node[token, len(prefix)]
    got = L.next_byte_distribution(torch.log_softmax(logits, -1), node.reshape(1), NEXT)[0]
    assert got.sum().item() == pytest.approx(1.0, abs=1e-12)
    want = brute_force(torch.softmax(logits, -1)[0].tolist(), prefix)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def toy_batch(text: str, pieces: list[str], seed=0):
    """Shifted targets of `text` read by the byte student and by the toy teacher as `pieces`."""
    assert "".join(pieces) == text
    s_labels = [b + 3 for b in text.encode()] + [1]
    s_off = [(i, i + 1) for i in range(len(text))] + [(len(text), len(text))]
    t_labels, t_off, at = [], [], 0
    for piece in pieces:
        t_labels.append(TOY.vocab[piece])
        t_off.append((at, at + len(piece)))
        at += len(piece)
    t_labels.append(1)
    t_off.append((len(text), len(text)))
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(1, len(s_labels), 259, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, len(t_labels), len(TOY), generator=gen, dtype=torch.float64) * 2
    targets = CrossTokenTargets(teacher_labels=torch.tensor([t_labels]), student_labels=torch.tensor([s_labels]),
                                student_offsets=torch.tensor([s_off]), teacher_offsets=torch.tensor([t_off]),
                                next_byte=NEXT)
    return student, teacher, targets.student_labels != -100, targets


def test_byte_kl_matches_a_reference_walk():
    text, pieces = "abcabab", ["abca", "b", "ab"]
    student, teacher, mask, targets = toy_batch(text, pieces)
    stats = {}
    got = L.byte_kl(student, teacher, mask, targets=targets, out_stats=stats)
    assert stats["compared_fraction"] == 1.0
    values, position = [], 0
    for j, piece in enumerate(pieces + [None]):
        probs = torch.softmax(teacher[0, j], -1).tolist()
        prefixes = [piece.encode()[:k] for k in range(len(piece))] if piece else [b""]
        for prefix in prefixes:
            p = brute_force(probs, prefix)
            q = torch.softmax(student[0, position], -1).tolist()
            ids = [b + 3 for b in range(256)] + [1]
            values.append(sum(pb * math.log(pb / q[ids[b]]) for b, pb in enumerate(p) if pb > 0))
            position += 1
    assert got.item() == pytest.approx(sum(values) / len(values), rel=1e-9)


def test_identical_byte_tokenizers_reduce_to_forward_kl():
    next_byte = build_next_byte_map(byte_tokenizer(), byte_tokenizer())
    gen = torch.Generator().manual_seed(0)
    text = "héllo €"
    data = list(text.encode())
    labels = torch.tensor([[b + 3 for b in data] + [1]])
    # byte tokens of one character share its character span, as the dual data gives them
    spans = [(i, i + 1) for i, ch in enumerate(text) for _ in ch.encode()] + [(len(text), len(text))]
    offsets = torch.tensor([spans])
    student = torch.randn(1, labels.shape[1], 259, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, labels.shape[1], 259, generator=gen, dtype=torch.float64) * 2
    teacher[..., [0, 2]] = -math.inf  # the teacher puts no mass on pad/unk
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[0, 0] = False
    targets = CrossTokenTargets(teacher_labels=torch.where(mask, labels, -100), student_labels=labels,
                                student_offsets=offsets, teacher_offsets=offsets, next_byte=next_byte)
    got = L.byte_kl(student, teacher, mask, targets=targets, temperature=1.5)
    torch.testing.assert_close(got, L.forward_kl(student, teacher, mask, temperature=1.5), rtol=1e-10, atol=1e-12)


def test_gradient_only_to_the_student_and_empty_mask_is_zero():
    student, teacher, mask, targets = toy_batch("abcab", ["abc", "ab"])
    student.requires_grad_()
    teacher.requires_grad_()
    L.byte_kl(student, teacher, mask, targets=targets).backward()
    assert teacher.grad is None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    empty = L.byte_kl(student, teacher, torch.zeros_like(mask), targets=targets)
    assert empty.item() == 0.0 and empty.requires_grad


def test_byte_kl_needs_a_next_byte_map():
    student, teacher, mask, targets = toy_batch("ab", ["ab"])
    with pytest.raises(ValueError, match="byte-level student"):
        L.byte_kl(student, teacher, mask, targets=targets._replace(next_byte=None))
    assert build_next_byte_map(TOY, byte_tokenizer()) is None  # the toy student has no single-byte id for most bytes

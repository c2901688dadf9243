"""X-Token's projected forward KL (loss=xtoken_kl) and its student -> teacher projection."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.data.bpe import train_bpe
from kd_lightning.data.dual import DualCollator, dual_samples
from kd_lightning.data.tokenizer import byte_tokenizer
from kd_lightning.data.vocab_map import token_bytes
from kd_lightning.data.vocab_projection import build_vocab_projection
from kd_lightning.losses import cross_token_targets, forward_kl, projected_kl, xtoken_kl
from kd_lightning.losses.align import VocabProjection
from kd_lightning.losses.cross_vocab import CrossTokenTargets

TEXT = ["The quick brown fox jumps over the lazy dog. Numbers 1234 and 56789 differ.\n",
        "Hundreds of naïve cafés serve crème brûlée; the dogs jump quickly.\n"] * 30


@pytest.fixture(scope="module")
def pair():
    return train_bpe(TEXT, 400), train_bpe(TEXT[:1] * 10, 300, min_frequency=3)


def random_projection(student_vocab: int, teacher_vocab: int, gen: torch.Generator) -> VocabProjection:
    """Every student token but the last onto 1-3 random teacher tokens; fold: random, some -1."""
    student_ids, teacher_ids, weights = [], [], []
    for s in range(student_vocab - 1):
        pieces = torch.randperm(teacher_vocab - 2, generator=gen)[: 1 + s % 3]  # the last two are never covered
        share = torch.rand(len(pieces), generator=gen, dtype=torch.float64) + 0.1
        student_ids += [s] * len(pieces)
        teacher_ids += pieces.tolist()
        weights += (share / share.sum()).tolist()
    covered = sorted(set(teacher_ids))
    fold = torch.tensor([j if j in covered else (covered[j % len(covered)] if j % 2 else -1)
                         for j in range(teacher_vocab)])
    return VocabProjection(torch.tensor(student_ids), torch.tensor(teacher_ids), torch.tensor(weights), fold)


def brute_force(student: torch.Tensor, teacher: torch.Tensor, projection: VocabProjection, T: float, fold: bool,
                eps: float) -> list[float]:
    """The formula by loops over a dense W, in Python floats."""
    W = [[0.0] * teacher.shape[-1] for _ in range(student.shape[-1])]
    for s, t, w in zip(projection.student_ids.tolist(), projection.teacher_ids.tolist(), projection.weights.tolist()):
        W[s][t] += w
    covered = {t for t in projection.teacher_ids.tolist()}
    values = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs, zt = [x / T for x in s_row], [x / T for x in t_row]
        ms, mt = max(zs), max(zt)
        q = [math.exp(x - ms) for x in zs]
        p = [math.exp(x - mt) for x in zt]
        q, p = [x / sum(q) for x in q], [x / sum(p) for x in p]
        projected = [sum(q[s] * W[s][j] for s in range(len(q))) for j in range(len(p))]
        if fold:
            target = [0.0] * len(p)
            for j, into in enumerate(projection.teacher_fold.tolist()):
                if into >= 0:
                    target[into] += p[j]
            value = sum(target[j] * math.log(target[j] / (projected[j] + eps)) for j in covered if target[j] > 0)
        else:
            value = sum(p[j] * math.log(p[j] / (projected[j] + eps if j in covered else eps)) for j in range(len(p)))
        values.append(value)
    return values


@pytest.mark.parametrize("fold", [True, False])
def test_projected_kl_matches_a_brute_force_formula_in_float64(fold: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    teacher = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    projection = random_projection(7, 9, gen)
    values = projected_kl(student, teacher, projection, temperature=1.7, fold_uncovered=fold, epsilon=1e-6)
    assert values.dtype == torch.float64
    assert values.tolist() == pytest.approx(brute_force(student, teacher, projection, 1.7, fold, 1e-6), rel=1e-12)


def one_tokenization(batch: int, length: int, vocab: int, gen: torch.Generator) -> CrossTokenTargets:
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :2] = -100
    offsets = torch.tensor([[(i, i + 1) for i in range(length)]] * batch)
    return CrossTokenTargets(teacher_labels=labels, student_labels=labels, student_offsets=offsets,
                             teacher_offsets=offsets)


def identity(vocab: int) -> VocabProjection:
    ids = torch.arange(vocab)
    return VocabProjection(ids, ids, torch.ones(vocab, dtype=torch.float64), ids)


@pytest.mark.parametrize("fold", [True, False])
def test_identical_tokenizers_reduce_to_the_forward_kl(fold: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 6, 10, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4] = False
    targets = one_tokenization(2, 6, 10, gen)._replace(projection=identity(10))
    stats = {}
    value = xtoken_kl(student, teacher, mask, targets=targets, temperature=2.0, fold_uncovered=fold, epsilon=0.0,
                      out_stats=stats)
    counted = mask & (targets.student_labels != -100)
    assert value.item() == pytest.approx(forward_kl(student, teacher, counted, temperature=2.0).item(), rel=1e-9)
    assert stats["row_fraction"] == 1.0 and stats["projected_mass"] == pytest.approx(1.0)


def test_relabelling_either_vocabulary_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 9, generator=gen)
    targets = one_tokenization(2, 5, 7, gen)._replace(projection=random_projection(7, 9, gen))
    sigma, tau = torch.randperm(7, generator=gen), torch.randperm(9, generator=gen)  # old id -> new id
    projection = targets.projection
    fold = torch.full((9,), -1)
    fold[tau] = torch.where(projection.teacher_fold >= 0, tau[projection.teacher_fold.clamp_min(0)], -1)
    relabelled = targets._replace(projection=VocabProjection(sigma[projection.student_ids], tau[projection.teacher_ids],
                                                             projection.weights, fold))
    new_student, new_teacher = torch.empty_like(student), torch.empty_like(teacher)
    new_student[..., sigma], new_teacher[..., tau] = student, teacher
    for fold_uncovered in (True, False):
        before = xtoken_kl(student, teacher, targets=targets, fold_uncovered=fold_uncovered)
        after = xtoken_kl(new_student, new_teacher, targets=relabelled, fold_uncovered=fold_uncovered)
        assert after.item() == pytest.approx(before.item(), rel=1e-5)


def test_gradients_are_finite_and_only_reach_the_student(pair) -> None:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 7, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 9, generator=gen, requires_grad=True)
    teacher.data[..., 3] = -math.inf  # a token the teacher rules out
    targets = one_tokenization(2, 5, 7, gen)._replace(projection=random_projection(7, 9, gen))
    for fold_uncovered in (True, False):
        value = xtoken_kl(student, teacher, targets=targets, fold_uncovered=fold_uncovered)
        value.backward()
        assert torch.isfinite(value) and value > 0 and torch.isfinite(student.grad).all()
        assert teacher.grad is None
    empty = targets._replace(student_labels=torch.full((2, 5), -100))
    assert xtoken_kl(student, teacher, targets=empty).item() == 0.0


def test_the_projection_of_a_tokenizer_onto_itself_is_the_identity(pair) -> None:
    student, _ = pair
    projection = build_vocab_projection(student, student)
    assert torch.equal(projection.student_ids, projection.teacher_ids)
    assert set(projection.student_ids.tolist()) == set(range(len(student)))  # specials by role, the rest by bytes
    assert (projection.weights == 1).all() and torch.equal(projection.teacher_fold, torch.arange(len(student)))


def test_projection_between_two_bpes_retokenises_and_folds(pair) -> None:
    student, teacher = pair
    projection = build_vocab_projection(student, teacher, decay=0.5, top_k=4)
    s_bytes, t_bytes = token_bytes(student), token_bytes(teacher)
    rows: dict[int, list[tuple[int, float]]] = {}
    for s, t, w in zip(projection.student_ids.tolist(), projection.teacher_ids.tolist(), projection.weights.tolist()):
        rows.setdefault(s, []).append((t, w))
    assert set(rows) >= set(s_bytes)  # every ordinary student token has a row
    several = 0
    for s, entries in rows.items():
        assert sum(w for _, w in entries) == pytest.approx(1.0)
        if len(entries) == 1:
            continue
        several += 1
        assert all(t_bytes[t] in s_bytes[s] for t, _ in entries)
        try:
            text = s_bytes[s].decode("utf-8")
        except UnicodeDecodeError:  # part of a character: cut greedily into teacher tokens instead
            continue
        pieces = teacher(text, add_special_tokens=False)["input_ids"]
        assert b"".join(t_bytes[p] for p in pieces) == s_bytes[s]
        first = max(entries, key=lambda entry: entry[1])[0]
        assert first == pieces[0] or len(set(pieces)) < len(pieces)  # front-loaded: the first piece weighs most
    assert several > 10  # the student's longer words are spelled in pieces by the teacher
    covered = set(projection.teacher_ids.tolist())
    for j, into in enumerate(projection.teacher_fold.tolist()):
        if into >= 0 and j in t_bytes:
            assert into in covered and t_bytes[j].startswith(t_bytes[into])


def test_projection_onto_bytes_cuts_every_token_into_its_bytes(pair) -> None:
    student, _ = pair
    projection = build_vocab_projection(student, byte_tokenizer(), decay=0.0, top_k=1)
    s_bytes = token_bytes(student)
    first = dict(zip(projection.student_ids.tolist(), projection.teacher_ids.tolist()))
    for s, value in s_bytes.items():
        if value not in (b"<eos>", b"<bos>"):
            assert first[s] == value[0] + 3  # decay 0: all the mass on the first byte


def test_xtoken_kl_on_a_real_dual_batch(pair) -> None:
    student_tok, teacher_tok = pair
    samples = [s for text in TEXT[:2] for s in dual_samples(text, student_tok, teacher_tok, 32)]
    batch = DualCollator.for_tokenizers(student_tok, teacher_tok)(samples)
    targets = cross_token_targets(batch, projection=build_vocab_projection(student_tok, teacher_tok))
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(*batch["input_ids"].shape, len(student_tok), generator=gen, requires_grad=True)
    teacher = torch.randn(*batch["teacher_input_ids"].shape, len(teacher_tok), generator=gen)
    stats = {}
    mask = targets.student_labels != -100
    value = xtoken_kl(student[:, :-1], teacher[:, :-1], mask, targets=targets, out_stats=stats)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    assert 0.5 < stats["row_fraction"] <= 1 and 0.99 < stats["projected_mass"] <= 1 + 1e-6
    assert stats["covered_teacher_mass"] == pytest.approx(1.0, abs=1e-3)  # folding keeps the teacher's mass

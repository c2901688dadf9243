"""Sparse teacher targets: Random-Sampling KD is unbiased, Top-K is not; sparse_kl vs references."""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L

VOCAB = 20


def teacher_and_student(rows=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(VOCAB, generator=gen, dtype=torch.float64) * 1.5
    student = torch.randn(VOCAB, generator=gen, dtype=torch.float64)
    return teacher.expand(rows, VOCAB).clone(), student.expand(rows, VOCAB).clone()


def densify(targets: L.SparseTargets) -> torch.Tensor:
    shape = targets.indices.shape[:-1] + (VOCAB,)
    return torch.zeros(shape, dtype=targets.probs.dtype).scatter_add(-1, targets.indices, targets.probs)


def sparse_kl_ref(student_row, indices, probs, temperature) -> float:
    scaled = [x / temperature for x in student_row]
    log_norm = math.log(sum(math.exp(x) for x in scaled))
    return sum(p * (math.log(p) - (scaled[i] - log_norm)) for i, p in zip(indices, probs) if p > 0)


def test_topk_targets():
    teacher, _ = teacher_and_student(rows=3)
    p = torch.softmax(teacher / 2.0, -1)
    raw = L.topk_targets(teacher, 4, temperature=2.0, renormalize=False)
    expected_probs, expected_ids = torch.sort(p, descending=True)
    torch.testing.assert_close(raw.probs, expected_probs[:, :4])
    assert torch.equal(raw.indices, expected_ids[:, :4])
    renormalized = L.topk_targets(teacher, 4, temperature=2.0)
    torch.testing.assert_close(renormalized.probs, raw.probs / raw.probs.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="k must"):
        L.topk_targets(teacher, VOCAB + 1)


def test_sample_targets_format():
    teacher, _ = teacher_and_student(rows=6)
    gen = torch.Generator().manual_seed(1)
    targets = L.sample_targets(teacher.reshape(2, 3, VOCAB), 50, generator=gen)
    assert targets.indices.shape[:-1] == (2, 3) and targets.indices.dtype == torch.long
    torch.testing.assert_close(targets.probs.sum(-1), torch.ones(2, 3, dtype=targets.probs.dtype))
    counts = targets.probs * 50
    torch.testing.assert_close(counts, counts.round())  # p̂ = count / N exactly
    width = targets.indices.shape[-1]
    assert width == int((targets.probs > 0).sum(-1).max())  # padded to the batch's max unique ids
    for row in targets.indices.reshape(-1, width).tolist():
        assert len(set(row)) == width  # no id appears twice, padding included
    again = L.sample_targets(teacher.reshape(2, 3, VOCAB), 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.indices, targets.indices)
    fixed = L.sample_targets(teacher, 50, generator=gen, width=50)
    assert fixed.indices.shape == (6, VOCAB)  # never wider than the vocabulary
    with pytest.raises(ValueError, match="width=1"):
        L.sample_targets(teacher, 50, generator=gen, width=1)


def test_sampled_targets_are_unbiased():
    rows, draws = 4000, 16
    teacher, _ = teacher_and_student(rows=rows)
    p = torch.softmax(teacher[0], -1)
    estimate = densify(L.sample_targets(teacher, draws, generator=torch.Generator().manual_seed(2))).mean(0)
    sigma = torch.sqrt(p * (1 - p) / (draws * rows))
    assert ((estimate - p).abs() <= 4 * sigma + 1e-12).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_matches_reference(temperature):
    teacher, student = teacher_and_student(rows=6, seed=3)
    student = student + torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    targets = L.sample_targets(teacher, 12, generator=torch.Generator().manual_seed(5))
    got = L.sparse_kl(student, targets, mask, temperature=temperature)
    values = [sparse_kl_ref(s, i, p, temperature) for s, i, p, m in
              zip(student.tolist(), targets.indices.tolist(), targets.probs.tolist(), mask.tolist()) if m]
    assert got.item() == pytest.approx(sum(values) / len(values), rel=1e-10)
    ce = L.sparse_kl(student, targets, mask, temperature=temperature, value_form="ce", reduction="none")
    entropy = -torch.xlogy(targets.probs, targets.probs).sum(-1)
    none = L.sparse_kl(student, targets, mask, temperature=temperature, reduction="none")
    torch.testing.assert_close(ce, torch.where(mask, none + entropy, 0.0))
    assert (none[~mask] == 0).all()


def test_full_support_target_equals_dense_forward_kl():
    teacher, student = teacher_and_student(rows=3, seed=6)
    teacher[1, 4] = -math.inf
    targets = L.topk_targets(teacher, VOCAB, temperature=1.5)  # every token kept: exactly p
    torch.testing.assert_close(L.sparse_kl(student, targets, temperature=1.5),
                               L.forward_kl(student, teacher, temperature=1.5))


def test_sparse_kl_gradient_and_masking():
    teacher, student = teacher_and_student(rows=4, seed=7)
    targets = L.sample_targets(teacher, 8, generator=torch.Generator().manual_seed(8))
    student.requires_grad_(True)
    mask = torch.tensor([True, True, False, True])
    (grad,) = torch.autograd.grad(L.sparse_kl(student, targets, mask, temperature=2.0), student)
    q = torch.softmax(student.detach() / 2.0, -1)
    expected = torch.where(mask[:, None], (q - densify(targets)) / 2.0, 0.0) / 3
    torch.testing.assert_close(grad, expected)
    empty = L.sparse_kl(student, targets, torch.zeros(4, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="do not match"):
        L.sparse_kl(student[:3], targets)


def test_expected_gradient_unbiased_for_sampling_biased_for_topk():
    rows, draws = 4000, 16
    teacher, student = teacher_and_student(rows=rows, seed=9)
    p, q = torch.softmax(teacher[0], -1), torch.softmax(student[0], -1)
    dense_grad = q - p  # forward-KL gradient of one position
    sigma = torch.sqrt(p * (1 - p) / (draws * rows))

    def mean_gradient(targets):
        s = student.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(L.sparse_kl(s, targets), s)
        return grad.sum(0)  # token-mean gradient rows sum to the average per-position gradient

    sampled = mean_gradient(L.sample_targets(teacher, draws, generator=torch.Generator().manual_seed(10)))
    assert ((sampled - dense_grad).abs() <= 4 * sigma + 1e-12).all()
    top_k = mean_gradient(L.topk_targets(teacher, 3))
    assert ((top_k - dense_grad).abs() > 10 * sigma).any()


def test_online_sparse_kl_matches_sparse_kl_on_the_same_draws_and_ignores_masked_rows() -> None:
    from kd_lightning.losses import online_sparse_kl, sample_targets, sparse_kl, topk_targets

    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 17, generator=g)
    teacher = torch.randn(2, 5, 17, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    got = online_sparse_kl(student, teacher, mask, num_draws=30, generator=torch.Generator().manual_seed(9))
    dense = torch.zeros_like(teacher)
    dense[mask] = teacher[mask]
    want = sparse_kl(student, sample_targets(dense, 30, generator=torch.Generator().manual_seed(9)), mask)
    assert torch.allclose(got, want)
    teacher_garbage = teacher.clone()
    teacher_garbage[~mask] = float("nan")
    again = online_sparse_kl(student, teacher_garbage, mask, num_draws=30, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(got, again)
    top = online_sparse_kl(student, teacher, None, encoding="topk", k=4)
    assert torch.allclose(top, sparse_kl(student, topk_targets(teacher, 4)))

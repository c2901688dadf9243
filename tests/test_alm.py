"""ALM (approximate likelihood matching, Minixhofer et al. 2025) against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L
from kd_lightning.losses.align import span_groups
from kd_lightning.losses.cross_vocab import CrossTokenTargets
from test_cross_vocab import make_batch


def log_softmax_ref(row):
    top = max(row)
    norm = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - norm for v in row]


def binary_kl_ref(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def binary_ref(a, b, kind):
    """Divergence between Bernoulli(e^a) (teacher) and Bernoulli(e^b) (student), plain math."""
    p, q = math.exp(a), math.exp(b)
    if kind == "binary_kl":
        return binary_kl_ref(p, q)
    if kind == "reverse_binary_kl":
        return binary_kl_ref(q, p)
    m = (p + q) / 2
    return 0.5 * binary_kl_ref(p, m) + 0.5 * binary_kl_ref(q, m)


def alm_ref(student, teacher, mask, targets, tau=1.0, kind="binary_kl", weight="chunks", eps=1e-6, temperature=1.0):
    total = norm = 0.0
    for b in range(student.shape[0]):
        s_lab, t_lab = targets.student_labels[b].tolist(), targets.teacher_labels[b].tolist()
        for g in span_groups(targets.student_offsets[b], targets.teacher_offsets[b]):
            s_rng, t_rng = range(g.student_start, g.student_end), range(g.teacher_start, g.teacher_end)
            if not s_rng or not t_rng or any(s_lab[i] == -100 or not mask[b, i] for i in s_rng) \
                    or any(t_lab[j] == -100 for j in t_rng):
                continue
            ls = sum(log_softmax_ref([v / temperature for v in student[b, i].tolist()])[s_lab[i]] for i in s_rng)
            lt = sum(log_softmax_ref([v / temperature for v in teacher[b, j].tolist()])[t_lab[j]] for j in t_rng)
            w = 1.0 if weight == "chunks" else len(t_rng) if weight == "teacher_tokens" else len(s_rng)
            total += w * binary_ref(min(lt, 0) / tau - eps, min(ls, 0) / tau - eps, kind)
            norm += w
    return total / norm if norm else 0.0


@pytest.mark.parametrize("kind", ["binary_kl", "reverse_binary_kl", "binary_js"])
@pytest.mark.parametrize("tau, weight", [(1.0, "chunks"), (3.0, "teacher_tokens"), (0.7, "student_tokens")])
def test_alm_matches_reference_on_two_tokenizations(kind, tau, weight):
    student, teacher, mask, targets = make_batch()
    stats = {}
    got = L.alm(student, teacher, mask, targets=targets, likelihood_temperature=tau, divergence=kind,
                chunk_weight=weight, out_stats=stats)
    assert got.item() == pytest.approx(alm_ref(student, teacher, mask, targets, tau, kind, weight), rel=1e-9)
    assert stats["chunks"] > 0 and stats["student_tokens_per_chunk"] >= 1


def test_alm_kd_temperature_divides_logits():
    student, teacher, mask, targets = make_batch()
    got = L.alm(student, teacher, mask, targets=targets, temperature=2.0)
    assert got.item() == pytest.approx(alm_ref(student, teacher, mask, targets, temperature=2.0), rel=1e-9)


def identical(seed=0, vs=7, vt=11, length=6):
    """One tokenization shared by both sides (one token per character), different vocabularies."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(2, length, vs, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(2, length, vt, generator=gen, dtype=torch.float64) * 2
    offsets = torch.tensor([[(i, i + 1) for i in range(length)]] * 2)
    labels = torch.randint(0, vs, (2, length), generator=gen)
    labels[1, :2] = -100  # a prompt
    targets = CrossTokenTargets(teacher_labels=labels, student_labels=labels, student_offsets=offsets,
                                teacher_offsets=offsets)
    return student, teacher, labels != -100, targets


@pytest.mark.parametrize("kind", ["binary_kl", "reverse_binary_kl", "binary_js"])
def test_identical_tokenizations_give_the_per_token_binary_divergence(kind):
    student, teacher, mask, targets = identical()
    tau, eps = 2.5, 1e-6
    want = []
    for b, i in mask.nonzero().tolist():
        y = targets.student_labels[b, i].item()
        lq = log_softmax_ref(student[b, i].tolist())[y]
        lp = log_softmax_ref(teacher[b, i].tolist())[y]
        want.append(binary_ref(lp / tau - eps, lq / tau - eps, kind))
    got = L.alm(student, teacher, mask, targets=targets, likelihood_temperature=tau, divergence=kind)
    assert got.item() == pytest.approx(sum(want) / len(want), rel=1e-9)
    per_token = L.binary_divergence(torch.tensor([lp / tau - eps], dtype=torch.float64),
                                    torch.tensor([lq / tau - eps], dtype=torch.float64), kind)
    assert per_token.item() == pytest.approx(want[-1], rel=1e-9)


@pytest.mark.parametrize("kind", ["binary_kl", "reverse_binary_kl", "binary_js"])
def test_zero_when_the_likelihoods_agree(kind):
    student, _, mask, targets = identical()
    value = L.alm(student, student.clone(), mask, targets=targets, divergence=kind)
    assert abs(value.item()) < 1e-12
    # A certain chunk (log p = 0 on both sides) stays finite thanks to epsilon.
    sure = torch.full_like(student, -50.0)
    sure.scatter_(-1, targets.student_labels.clamp_min(0).unsqueeze(-1), 50.0)
    assert torch.isfinite(L.alm(sure, sure, mask, targets=targets, divergence=kind))


def test_gradcheck_and_only_the_student_gets_gradient():
    student, teacher, mask, targets = identical(vs=4, vt=5, length=4)
    student = student.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: L.alm(s, teacher, mask, targets=targets, likelihood_temperature=2.0, divergence="binary_js"),
        (student,))
    two = make_batch()
    s2 = two[0].clone().requires_grad_()
    t2 = two[1].clone().requires_grad_()
    L.alm(s2, t2, two[2], targets=two[3]).backward()
    assert t2.grad is None and s2.grad is not None and torch.isfinite(s2.grad).all()


def test_empty_mask_gives_zero_not_nan():
    student, teacher, mask, targets = make_batch()
    student = student.clone().requires_grad_()
    value = L.alm(student, teacher, torch.zeros_like(mask), targets=targets)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert (student.grad == 0).all()


def test_alm_refuses_missing_targets_and_bad_options():
    student, teacher, mask, targets = make_batch()
    with pytest.raises(ValueError, match="alm needs targets"):
        L.alm(student, teacher, mask)
    with pytest.raises(ValueError, match="likelihood_temperature"):
        L.alm(student, teacher, mask, targets=targets, likelihood_temperature=0)
    with pytest.raises(ValueError, match="divergence must be"):
        L.alm(student, teacher, mask, targets=targets, divergence="kl")

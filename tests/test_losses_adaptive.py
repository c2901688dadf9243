"""AKL, TAID and ULD against plain-Python float64 references, plus their METHODS.md properties.
(The shared contract tests for these losses live in test_losses.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L
from test_losses import entropy_ref, kl_ref, make_logits, reference_loss, softmax_ref


# ----------------------------------------------------------------------------------------------
# AKL
# ----------------------------------------------------------------------------------------------
def akl_weight_ref(q: list[float], p: list[float], mu: float, faithful: bool) -> float:
    order = sorted(range(len(p)), key=lambda i: p[i])  # ascending teacher probability
    head_by_token, head_by_rank, cumulative = [False] * len(p), [], 0.0
    for token in order:
        cumulative += p[token]
        head_by_token[token] = cumulative >= mu
        head_by_rank.append(cumulative >= mu)
    head = head_by_rank if faithful else head_by_token  # the port's bug: rank mask on token gaps
    g_head = sum(abs(p[v] - q[v]) for v in range(len(p)) if head[v])
    g_tail = sum(abs(p[v] - q[v]) for v in range(len(p)) if not head[v])
    return g_head / (g_head + g_tail)


def akl_ref(q, p, mu=0.5, faithful=False):
    w = akl_weight_ref(q, p, mu, faithful)
    return w * kl_ref(p, q) + (1 - w) * kl_ref(q, p)


@pytest.mark.parametrize("faithful", [False, True])
@pytest.mark.parametrize("temperature,mu", [(1.0, 0.5), (2.0, 0.8)])
def test_akl_matches_reference(faithful, temperature, mu):
    student, teacher, mask = make_logits(seed=2)
    got = L.adaptive_kl(student, teacher, mask, temperature=temperature, mu=mu, faithful_head_mask=faithful)
    want = reference_loss(lambda q, p: akl_ref(q, p, mu, faithful), student, teacher, mask, temperature)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_akl_head_mask_quirk_changes_the_value():
    student, teacher, mask = make_logits(seed=2)
    assert not torch.allclose(L.adaptive_kl(student, teacher, mask),
                              L.adaptive_kl(student, teacher, mask, faithful_head_mask=True))


def test_akl_mu_zero_is_forward_kl():
    student, teacher, mask = make_logits(seed=2)  # every token is "head" when μ = 0
    torch.testing.assert_close(L.adaptive_kl(student, teacher, mask, mu=0.0), L.forward_kl(student, teacher, mask))


def test_akl_detached_weights_gradient():
    student, teacher, mask = make_logits(seed=2, teacher_zeros=False)
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(L.adaptive_kl(student, teacher, mask), student)
    weights = torch.tensor([
        akl_weight_ref(softmax_ref(s), softmax_ref(t), 0.5, False)
        for s, t in zip(student.detach().reshape(-1, 11).tolist(), teacher.reshape(-1, 11).tolist())
    ], dtype=torch.float64).reshape(mask.shape)
    fkl = L.forward_kl(student, teacher, mask, reduction="none")
    rkl = L.reverse_kl(student, teacher, mask, reduction="none")
    (expected,) = torch.autograd.grad((weights * fkl + (1 - weights) * rkl).sum() / mask.sum(), student)
    torch.testing.assert_close(grad, expected)
    # Undetached weights (port behaviour) give a different, but still correct, gradient.
    s = student.detach()[:2, :2, :6].clone().requires_grad_(True)
    t = teacher[:2, :2, :6]
    assert torch.autograd.gradcheck(lambda x: L.adaptive_kl(x, t, detach_weights=False), (s,))
    (grad_port,) = torch.autograd.grad(L.adaptive_kl(student, teacher, mask, detach_weights=False), student)
    assert not torch.allclose(grad_port, grad)


def test_akl_cross_entropy_form():
    student, teacher, mask = make_logits(seed=2, teacher_zeros=False)
    kl = L.adaptive_kl(student, teacher, mask, reduction="none")
    ce = L.adaptive_kl(student, teacher, mask, reduction="none", value_form="ce")
    rows = zip(student.reshape(-1, 11).tolist(), teacher.reshape(-1, 11).tolist(), mask.reshape(-1).tolist())
    extra = [akl_weight_ref(softmax_ref(s), softmax_ref(t), 0.5, False) * entropy_ref(softmax_ref(t)) if m else 0.0
             for s, t, m in rows]
    torch.testing.assert_close(ce - kl, torch.tensor(extra, dtype=torch.float64).reshape(mask.shape))


# ----------------------------------------------------------------------------------------------
# TAID
# ----------------------------------------------------------------------------------------------
def taid_ref(student_row, teacher_row, t, temperature):
    # At exactly t = 0 the target is the student itself, teacher zeros included (0·(−inf) := 0).
    mixed = [(1 - t) * s / temperature + (t * z / temperature if t > 0 else 0.0)
             for s, z in zip(student_row, teacher_row)]
    return kl_ref(softmax_ref(mixed), softmax_ref(student_row, temperature))


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_taid_matches_reference(t, temperature):
    student, teacher, mask = make_logits(seed=4)
    got = L.taid(student, teacher, mask, temperature=temperature, interpolation=t)
    rows = zip(student.reshape(-1, 11).tolist(), teacher.reshape(-1, 11).tolist(), mask.reshape(-1).tolist())
    values = [taid_ref(s, z, t, temperature) for s, z, m in rows if m]
    assert got.item() == pytest.approx(sum(values) / len(values), rel=1e-9, abs=1e-12)


def test_taid_gradients():
    student, teacher, mask = make_logits(seed=4)
    student.requires_grad_(True)

    def grad_of(value):
        return torch.autograd.grad(value, student)[0]

    torch.testing.assert_close(grad_of(L.taid(student, teacher, mask, interpolation=1.0)),
                               grad_of(L.forward_kl(student, teacher, mask)))
    assert grad_of(L.taid(student, teacher, mask, interpolation=0.0)).abs().max() < 1e-12
    # In general ∂L/∂zS = (q − p_t)/T per counted position, token-mean.
    t, temperature = 0.4, 1.5
    q = torch.softmax(student.detach() / temperature, -1)
    target = torch.softmax(((1 - t) * student.detach() + t * teacher) / temperature, -1)
    expected = torch.where(mask[..., None], (q - target) / temperature, 0.0) / mask.sum()
    torch.testing.assert_close(grad_of(L.taid(student, teacher, mask, temperature=temperature, interpolation=t)),
                               expected)


def test_taid_interpolation_argument():
    student, teacher, mask = make_logits(seed=4)
    with pytest.raises(ValueError, match="TAID schedule callback"):
        L.taid(student, teacher, mask)
    with pytest.raises(ValueError, match="interpolation"):
        L.taid(student, teacher, mask, interpolation=1.5)
    torch.testing.assert_close(L.taid(student, teacher, mask, interpolation=torch.tensor(0.7)),
                               L.taid(student, teacher, mask, interpolation=0.7))
    kl = L.taid(student, teacher, mask, interpolation=1.0, reduction="none")
    ce = L.taid(student, teacher, mask, interpolation=1.0, reduction="none", value_form="ce")
    torch.testing.assert_close(ce, L.forward_kl(student, teacher, mask, reduction="none", value_form="ce"))
    assert (ce[mask] > kl[mask]).all()


# ----------------------------------------------------------------------------------------------
# ULD
# ----------------------------------------------------------------------------------------------
def uld_ref(q: list[float], p: list[float]) -> float:
    width = max(len(q), len(p))
    q_sorted = sorted(q, reverse=True) + [0.0] * (width - len(q))
    p_sorted = sorted(p, reverse=True) + [0.0] * (width - len(p))
    return sum(abs(a - b) for a, b in zip(q_sorted, p_sorted))


def cross_vocab_logits():
    student, _, mask = make_logits(seed=6)
    teacher, _, _ = make_logits(shape=(3, 4, 17), seed=7)  # different (larger) vocabulary, with zeros
    return student, teacher, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_reference_across_vocab_sizes(temperature):
    student, teacher, mask = cross_vocab_logits()
    got = L.uld(student, teacher, mask, temperature=temperature)
    assert got.item() == pytest.approx(reference_loss(uld_ref, student, teacher, mask, temperature), rel=1e-9)
    swapped = L.uld(teacher, student, mask, temperature=temperature)  # student vocab larger than teacher's
    torch.testing.assert_close(swapped, got)


def test_uld_seq_mean_matches_reference_code_reduction():
    student, teacher, mask = cross_vocab_logits()
    per_seq = []
    for b in range(mask.shape[0]):
        rows = [uld_ref(softmax_ref(student[b, i].tolist()), softmax_ref(teacher[b, i].tolist()))
                for i in range(mask.shape[1]) if mask[b, i]]
        if rows:
            per_seq.append(sum(rows) / len(rows))
    got = L.uld(student, teacher, mask, reduction="seq_mean")
    assert got.item() == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-9)


def test_uld_properties():
    student, teacher, mask = cross_vocab_logits()
    value = L.uld(student, teacher, mask)
    permuted = teacher[..., torch.randperm(teacher.shape[-1])]
    torch.testing.assert_close(L.uld(student, permuted, mask), value)
    padded = torch.cat([teacher, torch.full((3, 4, 5), -math.inf, dtype=teacher.dtype)], dim=-1)
    torch.testing.assert_close(L.uld(student, padded, mask), value)
    peaked = L.uld(student * 50, teacher * 50, reduction="none")
    assert (peaked <= 2 + 1e-12).all() and (peaked >= 0).all()
    s = student[:1, :2, :6].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: L.uld(x, teacher[:1, :2]), (s,))

"""The fast KD path (kd_lightning.losses.fast) against the reference losses, values and gradients.

The references are the public losses of kd_lightning.losses, float64-tested in test_losses.py; here
they run in float64 on the same inputs, and the fast path (float32) must agree to float32 rounding.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import losses
from kd_lightning.losses import fast_kd_terms, supports_fast

SPECS = [
    ("forward_kl", {}),
    ("forward_kl", {"value_form": "ce"}),
    ("reverse_kl", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.3, "value_form": "ce"}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("jensen_shannon", {}),
    ("generalized_jsd", {"beta": 0.1}),
    ("generalized_jsd", {"beta": 0.0}),
    ("generalized_jsd", {"beta": 1.0}),
    ("total_variation", {}),
    ("adaptive_kl", {}),
    ("adaptive_kl", {"detach_weights": False, "value_form": "ce"}),
    ("adaptive_kl", {"faithful_head_mask": True, "mu": 0.3}),
    ("taid", {"interpolation": 0.3}),
    ("taid", {"interpolation": torch.tensor(0.7), "value_form": "ce"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in SPECS]


def make_batch(vocab: int, seed: int = 0, positions: tuple[int, int] = (2, 12)):
    """Logits [B, L, V], a mask with prompt-like holes, teacher rows with -inf (ruled-out tokens)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*positions, vocab, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(*positions, vocab, generator=gen, dtype=torch.float64) * 3
    teacher[0, 1:4, : vocab // 3] = -math.inf
    teacher[1, 5, 7:] = -math.inf  # a nearly one-hot teacher
    mask = torch.rand(positions, generator=gen) > 0.3
    mask[0, 1] = mask[1, 5] = True
    weight = torch.rand(int(mask.sum()), generator=gen, dtype=torch.float64) + 0.5
    targets = torch.randint(0, vocab, positions, generator=gen)
    return student, teacher, mask, weight, targets


def reference(fn, student, teacher, mask, weight, temperature):
    """Σ w · D over counted positions and its gradient w.r.t. the full student logits, float64."""
    student = student.clone().requires_grad_()
    per = fn(student, teacher, mask, temperature=temperature, reduction="none")[mask]
    value = (per * weight).sum()
    return value.detach(), torch.autograd.grad(value, student)[0]


def fast(fn, student, teacher, mask, weight, temperature, **kwargs):
    student = student.float().clone().requires_grad_()
    terms = fast_kd_terms(fn, student[mask], teacher.float()[mask], None, temperature=temperature,
                          token_weight=weight.float(), **kwargs)
    return terms.kd_sum.detach(), torch.autograd.grad(terms.kd_sum, student)[0]


def assert_close(got, expected):
    (fast_value, fast_grad), (ref_value, ref_grad) = got, expected
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(fast_value.double(), ref_value, rtol=1e-5, atol=1e-5)
    # float32 kernels against float64: 5e-6 of the largest gradient (gjsd at beta=0.1 reaches 2.6e-6 on some CPUs)
    torch.testing.assert_close(fast_grad.double(), ref_grad, rtol=0, atol=5e-6 * max(scale, 1e-3))


@pytest.mark.parametrize(("name", "params"), SPECS, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_fast_matches_reference_at_byte_vocab(name, params, temperature):
    fn = functools.partial(getattr(losses, name), **params)
    student, teacher, mask, weight, _ = make_batch(259)
    assert_close(fast(fn, student, teacher, mask, weight, temperature),
                 reference(fn, student, teacher, mask, weight, temperature))


@pytest.mark.parametrize(("name", "params"), SPECS, ids=IDS)
def test_fast_matches_reference_at_32k(name, params):
    fn = functools.partial(getattr(losses, name), **params)
    student, teacher, mask, weight, _ = make_batch(32000, seed=1, positions=(2, 10))
    got = fast(fn, student, teacher, mask, weight, 1.7, chunk_tokens=3)
    assert_close(got, reference(fn, student, teacher, mask, weight, 1.7))


def test_chunk_size_and_float32_reference_agree():
    student, teacher, mask, weight, _ = make_batch(259)
    results = [fast(losses.jensen_shannon, student, teacher, mask, weight, 2.0, chunk_tokens=c) for c in (1, 5, None)]
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-8)
    value32, grad32 = reference(losses.jensen_shannon, student.float(), teacher.float(), mask, weight.float(), 2.0)
    torch.testing.assert_close(results[0][0], value32, rtol=1e-5, atol=1e-6)


def test_forward_kl_gradient_is_the_closed_form():
    """∂/∂z Σ w·KL(p‖q) = w·(softmax(z/T) − p)/T, against the two-line float64 formula."""
    student, teacher, mask, weight, _ = make_batch(259)
    rows_s, rows_t, T = student[mask], teacher[mask], 3.0
    two_line = (F.kl_div(F.log_softmax(rows_s / T, -1), F.log_softmax(rows_t / T, -1), reduction="none",
                         log_target=True).nan_to_num(0.0).sum(-1) * weight).sum()
    expected = weight[:, None] * (torch.softmax(rows_s / T, -1) - torch.softmax(rows_t / T, -1)) / T
    value, grad = fast(losses.forward_kl, student, teacher, mask, weight, T)
    torch.testing.assert_close(value.double(), two_line, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[mask].double(), expected, rtol=0, atol=1e-7)


def test_strict_reverse_kl_is_infinite_where_the_teacher_rules_out_student_mass():
    fn = functools.partial(losses.reverse_kl, strict=True)
    student, teacher, mask, _, _ = make_batch(259)
    ones = torch.ones(int(mask.sum()), dtype=torch.float64)
    ref = fn(student, teacher, mask, reduction="none")[mask]
    rows = student.float()[mask].requires_grad_()
    terms = fast_kd_terms(fn, rows, teacher.float()[mask], None, temperature=1.0)
    finite = torch.isfinite(ref)
    assert not finite.all() and math.isinf(terms.kd_sum.item())
    # Rows with a finite value match the reference; +inf rows get zero gradient, as in the reference.
    part = fast_kd_terms(fn, rows, teacher.float()[mask], None, temperature=1.0, token_weight=finite.float())
    torch.testing.assert_close(part.kd_sum.double(), (ref[finite] * ones[finite]).sum(), rtol=1e-5, atol=1e-5)
    grad = torch.autograd.grad(part.kd_sum, rows)[0]
    assert torch.isfinite(grad).all() and (grad[~finite] == 0).all()


IDENTITY = [spec for spec in SPECS if spec[0] != "taid" and spec[1].get("value_form") != "ce"]


@pytest.mark.parametrize(("name", "params"), IDENTITY, ids=[IDS[SPECS.index(s)] for s in IDENTITY])
def test_identity_teacher_gives_zero_value_and_gradient(name, params):
    fn = functools.partial(getattr(losses, name), **params)
    logits = torch.randn(20, 259) * 2
    rows = logits.clone().requires_grad_()
    terms = fast_kd_terms(fn, rows, logits, None, temperature=1.5)
    grad = torch.autograd.grad(terms.kd_sum, rows)[0]
    assert abs(terms.kd_sum.item()) < 1e-5 and grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("ce", [False, True])
def test_empty_rows_give_zero_without_nan(ce):
    rows = torch.zeros(0, 259, requires_grad=True)
    terms = fast_kd_terms(losses.forward_kl, rows, torch.zeros(0, 259), torch.zeros(0, dtype=torch.long),
                          temperature=2.0, ce=ce)
    total = terms.kd_sum + (terms.ce_sum if ce else 0.0)
    assert total.item() == 0.0
    total.backward()
    assert rows.grad.shape == (0, 259)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_and_token_statistics_match_cross_entropy(temperature):
    student, teacher, mask, weight, targets = make_batch(259, seed=3)
    targets = targets[mask]
    targets[2] = -100  # an ignored label counts 0 in CE
    rows = student[mask].float().requires_grad_()
    terms = fast_kd_terms(losses.skew_kl, rows, teacher[mask].float(), targets, temperature=temperature,
                          token_weight=weight.float(), ce=True)
    (0.7 * terms.kd_sum + 0.4 * terms.ce_sum).backward()

    ref_rows = student[mask].clone().requires_grad_()
    kd = (losses.skew_kl(ref_rows, teacher[mask], temperature=temperature, reduction="none") * weight).sum()
    ce = F.cross_entropy(ref_rows, targets, reduction="sum")
    (0.7 * kd + 0.4 * ce).backward()
    torch.testing.assert_close(terms.ce_sum.double(), ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.grad.double(), ref_rows.grad, rtol=0, atol=1e-6)
    valid = targets >= 0
    s_ce = F.cross_entropy(student[mask], targets, reduction="none")
    t_ce = F.cross_entropy(teacher[mask], targets, reduction="none")
    torch.testing.assert_close(terms.student_token_ce.double(), s_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.teacher_token_ce[valid].double(), t_ce[valid], rtol=1e-5, atol=1e-5)
    assert not terms.teacher_token_ce.requires_grad and not terms.student_token_ce.requires_grad


def test_ce_off_builds_no_ce_and_token_stats_need_targets():
    student, teacher, mask, _, targets = make_batch(259)
    rows = student[mask].float().requires_grad_()
    terms = fast_kd_terms(losses.forward_kl, rows, teacher[mask].float(), targets[mask], temperature=1.0)
    assert terms.ce_sum is None and terms.student_token_ce.shape == (int(mask.sum()),)
    bare = fast_kd_terms(losses.forward_kl, rows, teacher[mask].float(), None, temperature=1.0)
    assert bare.teacher_token_ce is None and bare.student_token_ce is None
    with pytest.raises(ValueError, match="ce=True needs targets"):
        fast_kd_terms(losses.forward_kl, rows, teacher[mask].float(), None, temperature=1.0, ce=True)


def test_no_grad_and_one_backward_only():
    student, teacher, mask, _, targets = make_batch(259)
    rows = student[mask].float().requires_grad_()
    with torch.no_grad():
        terms = fast_kd_terms(losses.reverse_kl, rows, teacher[mask].float(), targets[mask], temperature=2.0, ce=True)
    assert terms.kd_sum.grad_fn is None and terms.ce_sum.grad_fn is None
    again = fast_kd_terms(losses.reverse_kl, rows, teacher[mask].float(), targets[mask], temperature=2.0, ce=True)
    torch.testing.assert_close(again.kd_sum.detach(), terms.kd_sum)
    again.kd_sum.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        again.kd_sum.backward()


def test_bfloat16_inputs_accumulate_in_float32():
    student, teacher, mask, weight, targets = make_batch(2048, seed=4)
    s16, t16 = student[mask].bfloat16(), teacher[mask].bfloat16()
    rows = s16.clone().requires_grad_()
    terms = fast_kd_terms(losses.forward_kl, rows, t16, targets[mask], temperature=1.0, ce=True)
    (terms.kd_sum + terms.ce_sum).backward()
    ref_rows = s16.double().requires_grad_()
    ref = losses.forward_kl(ref_rows, t16.double(), reduction="sum") + F.cross_entropy(ref_rows, targets[mask], reduction="sum")
    ref.backward()
    assert terms.kd_sum.dtype == torch.float32 and rows.grad.dtype == torch.bfloat16
    torch.testing.assert_close(terms.kd_sum.double() + terms.ce_sum.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rows.grad.double(), ref_rows.grad, rtol=1e-2, atol=1e-3)


def test_supports_fast_and_clear_error():
    assert all(supports_fast(getattr(losses, name)) for name, _ in SPECS)
    assert supports_fast(functools.partial(losses.skew_kl, alpha=0.2, value_form="ce"))
    assert supports_fast(functools.partial(functools.partial(losses.taid), interpolation=0.5))
    for fn in (losses.uld, losses.online_sparse_kl, losses.sparse_kl, lambda s, t, m=None, **k: s.sum(),
               functools.partial(losses.forward_kl, bogus=1), functools.partial(losses.skew_kl, 0.1)):
        assert not supports_fast(fn)
    with pytest.raises(ValueError, match="supports_fast"):
        fast_kd_terms(losses.uld, torch.zeros(2, 5), torch.zeros(2, 5), None, temperature=1.0)
    with pytest.raises(ValueError, match="token_weight shape"):
        fast_kd_terms(losses.forward_kl, torch.zeros(2, 5), torch.zeros(2, 5), None, temperature=1.0,
                      token_weight=torch.ones(3))

"""Token-level divergences: float64 references written with plain Python math, plus METHODS.md
sanity properties and the API contract shared by every token-level loss."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import pytest
import torch

import kd_lightning.losses as L

INF = math.inf


# ----------------------------------------------------------------------------------------------
# Independent references: Python floats, one position at a time.
# ----------------------------------------------------------------------------------------------
def softmax_ref(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [0.0 if x == -INF else math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def kl_ref(a: list[float], b: list[float], strict: bool = False) -> float:
    total = 0.0
    for x, y in zip(a, b):
        if x == 0.0:
            continue
        if y == 0.0:
            if strict:
                return INF
            continue  # dropped, as the references do
        total += x * math.log(x / y)
    return total


def mix_ref(a: list[float], b: list[float], weight_a: float) -> list[float]:
    return [weight_a * x + (1 - weight_a) * y for x, y in zip(a, b)]


def gjsd_ref(p: list[float], q: list[float], beta: float) -> float:
    m = mix_ref(p, q, beta)
    return beta * kl_ref(p, m) + (1 - beta) * kl_ref(q, m)


def entropy_ref(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


RowRef = Callable[[list[float], list[float]], float]  # (q, p) -> value

ROW_REFS: dict[str, tuple[Callable, dict, RowRef]] = {
    "fkl": (L.forward_kl, {}, lambda q, p: kl_ref(p, q)),
    "fkl_ce": (L.forward_kl, {"value_form": "ce"}, lambda q, p: kl_ref(p, q) + entropy_ref(p)),
    "rkl": (L.reverse_kl, {}, lambda q, p: kl_ref(q, p)),
    "skl": (L.skew_kl, {"alpha": 0.3}, lambda q, p: kl_ref(p, mix_ref(p, q, 0.3))),
    "skl_ce": (L.skew_kl, {"alpha": 0.1, "value_form": "ce"},
               lambda q, p: kl_ref(p, mix_ref(p, q, 0.1)) + entropy_ref(p)),
    "srkl": (L.skew_reverse_kl, {"alpha": 0.3}, lambda q, p: kl_ref(q, mix_ref(p, q, 0.7))),
    "js": (L.jensen_shannon, {}, lambda q, p: gjsd_ref(p, q, 0.5)),
    "gjsd": (L.generalized_jsd, {"beta": 0.1}, lambda q, p: gjsd_ref(p, q, 0.1)),
    "gjsd_b0": (L.generalized_jsd, {"beta": 0.0}, lambda q, p: kl_ref(p, q)),
    "gjsd_b1": (L.generalized_jsd, {"beta": 1.0}, lambda q, p: kl_ref(q, p)),
    "tvd": (L.total_variation, {}, lambda q, p: 0.5 * sum(abs(x - y) for x, y in zip(p, q))),
}


def reference_loss(row_ref: RowRef, student, teacher, mask, temperature: float, reduction: str = "mean"):
    values = []
    flat_s = student.reshape(-1, student.shape[-1]).tolist()
    flat_t = teacher.reshape(-1, teacher.shape[-1]).tolist()
    flat_m = [True] * len(flat_s) if mask is None else mask.reshape(-1).tolist()
    for s_row, t_row, counted in zip(flat_s, flat_t, flat_m):
        if counted:
            values.append(row_ref(softmax_ref(s_row, temperature), softmax_ref(t_row, temperature)))
    if reduction == "sum":
        return sum(values)
    return sum(values) / max(len(values), 1)


def make_logits(shape=(3, 4, 11), seed=0, teacher_zeros=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=gen, dtype=dtype) * 1.5
    teacher = torch.randn(shape, generator=gen, dtype=dtype) * 2.0
    if teacher_zeros:
        rows = teacher.view(-1, shape[-1])
        rows[1, 3] = -INF  # one zero-probability token
        rows[4:8, 0] = -INF  # a "vocab padding" column over several positions
    mask = torch.rand(shape[:-1], generator=gen) > 0.3
    mask.view(-1)[0] = True
    return student, teacher, mask


# Every token-level divergence with parameters at which it is a proper divergence; reused by the
# other loss test files for the contract tests.
ALL_TOKEN_LOSSES: dict[str, tuple[Callable, dict]] = {
    "fkl": (L.forward_kl, {}),
    "rkl": (L.reverse_kl, {}),
    "skl": (L.skew_kl, {"alpha": 0.1}),
    "srkl": (L.skew_reverse_kl, {"alpha": 0.1}),
    "js": (L.jensen_shannon, {}),
    "gjsd": (L.generalized_jsd, {"beta": 0.5}),
    "tvd": (L.total_variation, {}),
    "akl": (L.adaptive_kl, {}),
    "akl_port": (L.adaptive_kl, {"faithful_head_mask": True, "detach_weights": False}),
    "taid": (L.taid, {"interpolation": 0.6}),
    "uld": (L.uld, {}),
}
loss_ids = pytest.mark.parametrize("name", sorted(ALL_TOKEN_LOSSES))


# ----------------------------------------------------------------------------------------------
# Values against the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROW_REFS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference(name, temperature):
    fn, kwargs, row_ref = ROW_REFS[name]
    student, teacher, mask = make_logits()
    for reduction in ("mean", "sum"):
        got = fn(student, teacher, mask, temperature=temperature, reduction=reduction, **kwargs)
        want = reference_loss(row_ref, student, teacher, mask, temperature, reduction)
        assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12), reduction


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "srkl", "js", "gjsd", "tvd"])
def test_gradient_matches_finite_differences(name):
    fn, kwargs, _ = ROW_REFS[name]
    student, teacher, mask = make_logits(shape=(2, 3, 5), seed=1)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: fn(s, teacher, mask, temperature=1.7, **kwargs), (student,))


def test_classifier_shape_is_batchmean():
    student, teacher, _ = make_logits(shape=(6, 10), teacher_zeros=False)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="batchmean"
    )
    assert L.forward_kl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# METHODS.md sanity properties
# ----------------------------------------------------------------------------------------------
def test_skew_limits_and_bounds():
    student, teacher, mask = make_logits()
    fkl = L.forward_kl(student, teacher, mask, reduction="none")
    rkl = L.reverse_kl(student, teacher, mask, reduction="none")
    torch.testing.assert_close(L.skew_kl(student, teacher, mask, alpha=0.0), fkl.sum() / mask.sum())
    torch.testing.assert_close(L.skew_reverse_kl(student, teacher, mask, alpha=0.0), rkl.sum() / mask.sum())
    assert L.skew_kl(student, teacher, alpha=1.0).abs() < 1e-12
    assert L.skew_reverse_kl(student, teacher, alpha=1.0).abs() < 1e-12
    # Convexity bounds; the truncated RKL at teacher zeros is not an upper bound, so no zeros here.
    student, teacher, mask = make_logits(teacher_zeros=False)
    fkl = L.forward_kl(student, teacher, mask, reduction="none")
    rkl = L.reverse_kl(student, teacher, mask, reduction="none")
    for alpha in (0.1, 0.5, 0.9):
        skl = L.skew_kl(student, teacher, mask, alpha=alpha, reduction="none")
        srkl = L.skew_reverse_kl(student, teacher, mask, alpha=alpha, reduction="none")
        assert (skl <= (1 - alpha) * fkl + 1e-12).all() and (skl >= -1e-12).all()
        assert (srkl <= (1 - alpha) * rkl + 1e-12).all() and (srkl >= -1e-12).all()


def test_generalized_jsd_conventions():
    student, teacher, mask = make_logits()
    torch.testing.assert_close(L.generalized_jsd(student, teacher, mask, beta=0.0),
                               L.forward_kl(student, teacher, mask))
    torch.testing.assert_close(L.generalized_jsd(student, teacher, mask, beta=1.0),
                               L.reverse_kl(student, teacher, mask))
    torch.testing.assert_close(L.generalized_jsd(student, teacher, mask, beta=0.5),
                               L.jensen_shannon(student, teacher, mask))
    # Discontinuous at the endpoints (TRL special cases): near 0 the value tends to 0, not FKL.
    assert L.generalized_jsd(student, teacher, mask, beta=1e-6) < 1e-3 * L.forward_kl(student, teacher, mask)
    # Symmetry: swapping roles and β ↔ 1−β (teacher without zeros so both directions are finite).
    s, t, m = make_logits(teacher_zeros=False)
    torch.testing.assert_close(L.generalized_jsd(s, t, m, beta=0.3), L.generalized_jsd(t, s, m, beta=0.7))


def test_bounds_jsd_tvd_pinsker():
    student, teacher, _ = make_logits(shape=(50, 7), seed=3)
    student, teacher = student * 4, teacher * 4  # peaked distributions push toward the bounds
    js = L.jensen_shannon(student, teacher, reduction="none")
    tvd = L.total_variation(student, teacher, reduction="none")
    fkl = L.forward_kl(student, teacher, reduction="none")
    assert (js <= math.log(2) + 1e-12).all() and (js >= 0).all()
    assert (tvd <= 1 + 1e-12).all() and (tvd >= 0).all()
    assert (tvd <= torch.sqrt(fkl / 2) + 1e-12).all()
    torch.testing.assert_close(tvd, L.total_variation(teacher, student, reduction="none"))
    # Disjoint supports reach the bounds exactly.
    s = torch.tensor([[0.0, -INF]], dtype=torch.float64)
    t = torch.tensor([[-INF, 0.0]], dtype=torch.float64)
    assert L.jensen_shannon(s, t).item() == pytest.approx(math.log(2))
    assert L.total_variation(s, t).item() == pytest.approx(1.0)


def test_reverse_is_swapped_forward_and_strict():
    s, t, m = make_logits(teacher_zeros=False)
    torch.testing.assert_close(L.reverse_kl(s, t, m), L.forward_kl(t, s, m))
    student, teacher, mask = make_logits()
    assert torch.isinf(L.reverse_kl(student, teacher, mask, strict=True))
    values = L.reverse_kl(student, teacher, reduction="none", strict=True)
    assert torch.isinf(values[0, 1]) and torch.isinf(values[1]).all() and torch.isfinite(values[2]).all()
    assert torch.isfinite(L.reverse_kl(student, teacher, mask))


def test_cross_entropy_form_adds_teacher_entropy():
    student, teacher, mask = make_logits()
    p = torch.softmax(teacher, -1)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)
    kl = L.forward_kl(student, teacher, mask, reduction="none")
    ce = L.forward_kl(student, teacher, mask, reduction="none", value_form="ce")
    torch.testing.assert_close(ce, torch.where(mask, kl + entropy, torch.zeros_like(kl)))
    with pytest.raises(ValueError, match="value_form"):
        L.forward_kl(student, teacher, value_form="KL")


# ----------------------------------------------------------------------------------------------
# The contract, for every token-level loss
# ----------------------------------------------------------------------------------------------
@loss_ids
def test_zero_at_equality_with_row_shift(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, _, mask = make_logits()
    shift = torch.randn(student.shape[:-1] + (1,), dtype=student.dtype)
    assert fn(student, student + shift, mask, **kwargs).abs().item() < 1e-7


@loss_ids
def test_nonnegative_and_positive_when_different(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, mask = make_logits()
    values = fn(student, teacher, mask, reduction="none", **kwargs)
    assert (values >= -1e-12).all() and (values[mask] > 1e-6).all()


@loss_ids
def test_reductions_consistent(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, mask = make_logits()
    none = fn(student, teacher, mask, reduction="none", **kwargs)
    assert none.shape == mask.shape and (none[~mask] == 0).all()
    torch.testing.assert_close(none.sum(), fn(student, teacher, mask, reduction="sum", **kwargs))
    torch.testing.assert_close(none.sum() / mask.sum(), fn(student, teacher, mask, **kwargs))
    unmasked = fn(student, teacher, reduction="none", **kwargs)
    torch.testing.assert_close(none, torch.where(mask, unmasked, torch.zeros_like(unmasked)))
    per_seq = (none.sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(fn(student, teacher, mask, reduction="seq_mean", **kwargs), per_seq)
    with pytest.raises(ValueError, match="reduction"):
        fn(student, teacher, mask, reduction="batchmean", **kwargs)


@loss_ids
def test_masked_positions_do_not_matter(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, mask = make_logits()
    student.requires_grad_(True)
    value = fn(student, teacher, mask, **kwargs)
    (grad,) = torch.autograd.grad(value, student)
    garbage_s = torch.where(mask[..., None], student.detach(), torch.full_like(student, float("nan")))
    garbage_t = torch.where(mask[..., None], teacher, torch.full_like(teacher, -INF))  # all −inf rows
    garbage_s.requires_grad_(True)
    value2 = fn(garbage_s, garbage_t, mask, **kwargs)
    (grad2,) = torch.autograd.grad(value2, garbage_s)
    torch.testing.assert_close(value2, value)
    torch.testing.assert_close(grad2, grad)
    assert (grad2[~mask] == 0).all()


@loss_ids
def test_all_masked_is_zero_with_graph(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, _ = make_logits()
    student.requires_grad_(True)
    value = fn(student, teacher, torch.zeros(student.shape[:-1], dtype=torch.bool), **kwargs)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert (student.grad == 0).all()


@loss_ids
def test_finite_student_gradient_only(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, mask = make_logits()  # teacher has −inf logits
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    value = fn(student, teacher, mask, **kwargs)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


@loss_ids
def test_temperature_divides_both_logits_without_t_squared(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    student, teacher, mask = make_logits()
    torch.testing.assert_close(fn(student, teacher, mask, temperature=3.0, **kwargs),
                               fn(student / 3.0, teacher / 3.0, mask, **kwargs))
    with pytest.raises(ValueError, match="temperature"):
        fn(student, teacher, mask, temperature=0.0, **kwargs)


@loss_ids
def test_bf16_inputs_computed_in_float32(name):
    fn, kwargs = ALL_TOKEN_LOSSES[name]
    gen = torch.Generator().manual_seed(5)
    # Large vocabulary and close distributions: a bf16 log-softmax would be off by far more than 1e-2.
    student = (torch.randn(4, 8, 4096, generator=gen) * 3).bfloat16()
    teacher = (student.float() + 0.3 * torch.randn(4, 8, 4096, generator=gen)).bfloat16()
    value = fn(student, teacher, **kwargs)
    assert value.dtype == torch.float32
    reference = fn(student.double(), teacher.double(), **kwargs)
    assert value.item() == pytest.approx(reference.item(), rel=1e-2)


def test_shape_errors():
    student, teacher, mask = make_logits()
    with pytest.raises(ValueError, match="vocab sizes differ"):
        L.forward_kl(student, teacher[..., :5])
    with pytest.raises(ValueError, match="leading dims"):
        L.forward_kl(student, teacher[:2])
    with pytest.raises(ValueError, match="mask shape"):
        L.forward_kl(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="alpha"):
        L.skew_kl(student, teacher, alpha=1.5)
    with pytest.raises(TypeError, match="alpha"):
        L.forward_kl(student, teacher, alpha=0.1)


def test_public_signature_is_the_standard_one():
    params = inspect.signature(L.skew_kl).parameters
    assert list(params) == ["student_logits", "teacher_logits", "mask", "temperature", "reduction", "alpha",
                            "value_form"]
    assert params["alpha"].default == 0.1 and params["temperature"].kind is inspect.Parameter.KEYWORD_ONLY
    assert L.skew_kl.__name__ == "skew_kl" and "DistiLLM" in L.skew_kl.__doc__


def test_helpers():
    from kd_lightning.tasks import CausalLM

    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, 4, 5, -100, 7], [1, 2, 3, 4, -100]])
    shifted_logits, shifted_labels = CausalLM.align(logits, labels)
    assert torch.equal(shifted_logits, logits[:, :-1]) and torch.equal(shifted_labels, labels[:, 1:])
    assert torch.equal(CausalLM.labels({"labels": labels}), shifted_labels)
    mask = CausalLM.mask(shifted_labels)
    assert mask.tolist() == [[True, True, False, True], [True, True, True, False]]
    values = torch.arange(8.0).reshape(2, 4).requires_grad_(True)
    assert L.masked_mean(values, mask).item() == pytest.approx((0 + 1 + 3 + 4 + 5 + 6) / 6)
    empty = L.masked_mean(values, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad
    assert L.masked_mean(values).item() == pytest.approx(3.5)


def test_all_finite_is_one_reduction_that_never_misses_a_nonfinite_entry():
    from kd_lightning.losses.common import all_finite

    x = torch.randn(7, 13)
    assert all_finite(x)
    for bad in (math.inf, -math.inf, math.nan):
        y = x.clone()
        y[3, 5] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0, 0], y[1, 1] = math.inf, -math.inf  # inf + -inf = nan: still caught
    assert not all_finite(y)
    # finite entries whose sum overflows report False: callers then take their careful (exact) path
    assert not all_finite(torch.full((4,), 3e38))
    assert all_finite(torch.randn(3, requires_grad=True))

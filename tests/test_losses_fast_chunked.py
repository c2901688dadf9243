"""The fused (lm_head) and sparse fast paths against the reference losses, values and gradients."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import losses
from kd_lightning.losses import SparseTargets, chunked_kd_terms, fast_sparse_kd_terms, sample_targets, topk_targets


def heads(vocab: int, rows: int = 21, hidden: int = 8, teacher_hidden: int = 12, bias: bool = True, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    xt = torch.randn(rows, teacher_hidden, generator=gen, dtype=torch.float64)
    wt = torch.randn(vocab, teacher_hidden, generator=gen, dtype=torch.float64) * 0.5
    bt = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    weight = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    return x, w, b, xt, wt, bt, targets, weight


def reference(fn, x, w, b, xt, wt, bt, targets, weight, T, kd_scale, ce_scale):
    leaves = [p.clone().requires_grad_() for p in (x, w) + ((b,) if b is not None else ())]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if b is not None else 0)
    teacher = xt @ wt.T + (bt if bt is not None else 0)
    kd = (fn(logits, teacher, temperature=T, reduction="none") * weight).sum()
    ce = F.cross_entropy(logits, targets, reduction="sum")
    grads = torch.autograd.grad(kd_scale * kd + ce_scale * ce, leaves)
    return kd.detach(), ce.detach(), grads, F.cross_entropy(teacher, targets, reduction="none")


@pytest.mark.parametrize(("name", "params", "T", "bias"), [
    ("forward_kl", {}, 1.0, True),
    ("forward_kl", {}, 2.0, False),
    ("reverse_kl", {}, 1.5, True),
    ("generalized_jsd", {"beta": 0.3}, 1.0, True),
    ("taid", {"interpolation": 0.5}, 2.0, True),
])
def test_fused_matches_reference_values_and_gradients(name, params, T, bias):
    fn = functools.partial(getattr(losses, name), **params)
    x, w, b, xt, wt, bt, targets, weight = heads(32000 if name == "forward_kl" and bias else 259, bias=bias)
    kd_ref, ce_ref, grads_ref, teacher_ce = reference(fn, x, w, b, xt, wt, bt, targets, weight, T, 0.6, 0.3)
    leaves = [p.float().clone().requires_grad_() for p in (x, w) + ((b,) if bias else ())]
    terms = chunked_kd_terms(fn, leaves[0], leaves[1], leaves[2] if bias else None, xt.float(), wt.float(),
                                  None if bt is None else bt.float(), targets, temperature=T,
                                  token_weight=weight.float(), ce=True, chunk_size=4)
    grads = torch.autograd.grad(0.6 * terms.kd_sum + 0.3 * terms.ce_sum, leaves)
    torch.testing.assert_close(terms.kd_sum.double(), kd_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.ce_sum.double(), ce_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.teacher_token_ce.double(), teacher_ce, rtol=1e-5, atol=1e-4)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_fused_without_ce_no_grad_and_empty_rows():
    x, w, b, xt, wt, bt, targets, _ = heads(259)
    args = (x.float(), w.float().requires_grad_(), b.float(), xt.float(), wt.float(), bt.float(), targets)
    terms = chunked_kd_terms(losses.forward_kl, *args, temperature=1.0, chunk_size=5)
    assert terms.ce_sum is None
    (grad_w,) = torch.autograd.grad(terms.kd_sum, args[1])
    dense = losses.forward_kl(x.float() @ args[1].T + b.float(), xt.float() @ wt.float().T + bt.float(), reduction="sum")
    torch.testing.assert_close(grad_w, torch.autograd.grad(dense, args[1])[0], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        quiet = chunked_kd_terms(losses.forward_kl, *args, temperature=1.0, ce=True, chunk_size=5)
    assert quiet.kd_sum.grad_fn is None
    torch.testing.assert_close(quiet.kd_sum, terms.kd_sum.detach())
    empty = [a[:0] if i in (0, 3, 6) else a for i, a in enumerate(args)]
    empty[0] = empty[0].requires_grad_()
    zero = chunked_kd_terms(losses.forward_kl, *empty, temperature=2.0, ce=True, chunk_size=5)
    (zero.kd_sum + zero.ce_sum).backward()
    assert zero.kd_sum.item() == 0.0 and zero.ce_sum.item() == 0.0 and empty[0].grad.shape == (0, 8)


def test_fused_half_precision_head_accumulates_in_float32():
    x, w, b, xt, wt, bt, targets, _ = heads(512, bias=False)
    leaves = [x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()]
    terms = chunked_kd_terms(losses.forward_kl, leaves[0], leaves[1], None, xt.bfloat16(), wt.bfloat16(), None,
                                  targets, temperature=1.0, ce=True, chunk_size=8)
    (terms.kd_sum + terms.ce_sum).backward()
    assert leaves[1].grad.dtype == torch.bfloat16 and terms.kd_sum.dtype == torch.float32
    ref_x, ref_w = x.bfloat16().double().requires_grad_(), w.bfloat16().double().requires_grad_()
    logits = ref_x @ ref_w.T
    ref = losses.forward_kl(logits, xt.bfloat16().double() @ wt.bfloat16().double().T, reduction="sum")
    (ref + F.cross_entropy(logits, targets, reduction="sum")).backward()
    torch.testing.assert_close(leaves[1].grad.double(), ref_w.grad, rtol=3e-2, atol=3e-2 * ref_w.grad.abs().max().item())


def sparse_reference(student, targets, mask, weight, labels, T, value_form):
    rows = student.clone().requires_grad_()
    per = losses.sparse_kl(rows, targets, mask, temperature=T, reduction="none", value_form=value_form)[mask]
    kd = (per * weight).sum()
    ce = F.cross_entropy(rows[mask], labels, reduction="sum")
    return kd.detach(), ce.detach(), torch.autograd.grad(0.5 * kd + 2.0 * ce, rows)[0]


@pytest.mark.parametrize("value_form", ["kl", "ce"])
@pytest.mark.parametrize(("vocab", "T", "kind"), [(259, 1.0, "sample"), (259, 2.0, "topk"), (32000, 1.5, "sample")])
def test_sparse_matches_sparse_kl(value_form, vocab, T, kind):
    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 9, vocab, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 9, vocab, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(2, 9, generator=gen) > 0.3
    targets = (sample_targets(teacher, 12, generator=gen, width=12) if kind == "sample"
               else topk_targets(teacher, 7, renormalize=False))
    weight = torch.rand(int(mask.sum()), generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (int(mask.sum()),), generator=gen)
    kd_ref, ce_ref, grad_ref = sparse_reference(student, targets, mask, weight, labels, T, value_form)
    rows = student.float().clone().requires_grad_()
    counted = SparseTargets(targets.indices[mask], targets.probs[mask].float())
    terms = fast_sparse_kd_terms(rows[mask], counted, labels, temperature=T, token_weight=weight.float(), ce=True,
                                 value_form=value_form, chunk_tokens=4)
    grad = torch.autograd.grad(0.5 * terms.kd_sum + 2.0 * terms.ce_sum, rows)[0]
    torch.testing.assert_close(terms.kd_sum.double(), kd_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.ce_sum.double(), ce_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=0, atol=2e-6 * grad_ref.abs().max().item())
    assert terms.teacher_token_ce is None and terms.student_token_ce.shape == labels.shape


def test_sparse_identity_and_shape_errors():
    logits = torch.randn(6, 40)
    probs = torch.softmax(logits, -1)
    full = SparseTargets(torch.arange(40).expand(6, 40), probs)
    rows = logits.clone().requires_grad_()
    terms = fast_sparse_kd_terms(rows, full, None, temperature=1.0)
    assert abs(terms.kd_sum.item()) < 1e-5
    assert torch.autograd.grad(terms.kd_sum, rows)[0].abs().max() < 1e-6
    with pytest.raises(ValueError, match="do not match rows"):
        fast_sparse_kd_terms(rows, SparseTargets(full.indices[:3], full.probs[:3]), None, temperature=1.0)

"""The chunked fused path gives the plain path's loss and student gradients without [N, V] logits."""

from __future__ import annotations

import pytest
import torch

import kd_lightning.losses as L

B, T, H, H_TEACHER, V = 3, 13, 16, 24, 97

CASES = {
    "fkl": (L.forward_kl, {}),
    "rkl": (L.reverse_kl, {}),
    "skl": (L.skew_kl, {"alpha": 0.2}),
    "srkl": (L.skew_reverse_kl, {"alpha": 0.1}),
    "gjsd": (L.generalized_jsd, {"beta": 0.3}),
    "tvd": (L.total_variation, {}),
    "akl": (L.adaptive_kl, {}),
    "taid": (L.taid, {"interpolation": 0.4}),
}


def make_inputs(seed=0, dtype=torch.float32, teacher_vocab=V):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    student_hidden = randn(B, T, H).requires_grad_(True)
    weight = randn(V, H, scale=0.5).requires_grad_(True)
    bias = randn(V, scale=0.1).requires_grad_(True)
    teacher_hidden = randn(B, T, H_TEACHER)
    teacher_weight = randn(teacher_vocab, H_TEACHER, scale=0.5)
    teacher_bias = randn(teacher_vocab, scale=0.1)
    # Counted tokens cluster in a few places, so with chunk_size 5 some chunks of the sequence are
    # entirely masked and others partly.
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 11:] = True
    mask[2, :] = True
    mask[2, 7] = False
    return student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask


def plain_and_chunked(loss_fn, params, inputs, chunk_size, temperature=1.3):
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, mask = inputs
    leaves = (student_hidden, weight, bias)
    plain = loss_fn(student_hidden @ weight.T + bias, teacher_hidden @ teacher_weight.T + teacher_bias, mask,
                    temperature=temperature, **params)
    plain_grads = torch.autograd.grad(plain, leaves)
    chunked = L.chunked_distill_loss(
        student_hidden, weight, teacher_hidden, teacher_weight, mask, loss_fn, chunk_size=chunk_size,
        temperature=temperature, student_head_bias=bias, teacher_head_bias=teacher_bias, **params,
    )
    chunked_grads = torch.autograd.grad(chunked, leaves)
    return plain, plain_grads, chunked, chunked_grads


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_equals_plain(name, chunk_size):
    loss_fn, params = CASES[name]
    plain, plain_grads, chunked, chunked_grads = plain_and_chunked(loss_fn, params, make_inputs(), chunk_size)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (chunked_grads[0][~make_inputs()[-1]] == 0).all()


def test_chunked_cross_vocabulary_uld():
    plain, plain_grads, chunked, chunked_grads = plain_and_chunked(L.uld, {}, make_inputs(teacher_vocab=61), 4)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_all_masked_gives_zero_with_graph():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, _, mask = make_inputs()
    loss = L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, torch.zeros_like(mask),
                                  L.forward_kl, chunk_size=4, student_head_bias=bias)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (student_hidden.grad == 0).all() and (weight.grad == 0).all() and (bias.grad == 0).all()


def test_teacher_gets_no_gradient_and_grad_output_scales():
    student_hidden, weight, _, teacher_hidden, teacher_weight, _, mask = make_inputs()
    teacher_hidden.requires_grad_(True)
    teacher_weight.requires_grad_(True)

    def loss():
        return L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, mask, L.forward_kl,
                                      chunk_size=6)

    (base,) = torch.autograd.grad(loss(), weight)
    value = loss()
    (3.0 * value + value.detach()).backward()  # gradient through the custom backward is rescaled
    torch.testing.assert_close(weight.grad, 3.0 * base)
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    value = loss()
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        value.backward()


def test_no_grad_mode_and_no_mask():
    student_hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, _ = make_inputs()
    plain = L.reverse_kl(student_hidden @ weight.T, teacher_hidden @ teacher_weight.T)
    with torch.no_grad():
        chunked = L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, None,
                                         L.reverse_kl, chunk_size=7)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, plain.detach(), rtol=1e-5, atol=1e-7)


def test_frozen_head_and_bfloat16():
    student_hidden, weight, _, teacher_hidden, teacher_weight, _, mask = make_inputs(dtype=torch.bfloat16)
    weight.requires_grad_(False)  # e.g. a frozen, tied embedding: only hidden states get gradient
    plain = L.forward_kl(student_hidden @ weight.T, teacher_hidden @ teacher_weight.T, mask)
    (plain_grad,) = torch.autograd.grad(plain, student_hidden)
    chunked = L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, mask,
                                     L.forward_kl, chunk_size=5)
    (chunked_grad,) = torch.autograd.grad(chunked, student_hidden)
    assert chunked.dtype == torch.float32 and chunked_grad.dtype == torch.bfloat16
    torch.testing.assert_close(chunked, plain, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(chunked_grad.float(), plain_grad.float(), rtol=2e-2, atol=1e-3)


def test_argument_errors():
    student_hidden, weight, _, teacher_hidden, teacher_weight, _, mask = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, mask, L.forward_kl,
                               chunk_size=0)
    with pytest.raises(ValueError, match="leading"):
        L.chunked_distill_loss(student_hidden, weight, teacher_hidden[:2], teacher_weight, mask, L.forward_kl,
                               chunk_size=4)
    with pytest.raises(ValueError, match="mask shape"):
        L.chunked_distill_loss(student_hidden, weight, teacher_hidden, teacher_weight, mask[:, :3], L.forward_kl,
                               chunk_size=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on CI; run on a GPU box)")
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunked_matches_plain_on_cuda(name: str) -> None:
    loss_fn, params = CASES[name]
    inputs = [t.detach().to("cuda").requires_grad_(t.requires_grad) for t in make_inputs()]
    plain, plain_grads, chunked, chunked_grads = plain_and_chunked(loss_fn, params, inputs, chunk_size=5)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

"""A stored top-k's tail as one extra bin (`sparse_kl(tail="bucket")`) and the other tail modes."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.losses import forward_kl
from kd_lightning.losses.fast import fast_sparse_kd_terms
from kd_lightning.losses.sparse import SparseTargets, sparse_kl

V, K = 50, 7


def case(seed: int = 0, rows: int = 6, k: int = K, scale: float = 2.0):
    """float64 student logits [rows, V] and the teacher's top-k with its tail's mass."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, V, generator=g, dtype=torch.float64) * scale
    teacher = torch.softmax(torch.randn(rows, V, generator=g, dtype=torch.float64) * scale, -1)
    top, ids = teacher.topk(k, -1)
    return student, teacher, SparseTargets(ids, top, (1 - top.sum(-1)).clamp_min(0))


def by_hand(student: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """Σ_rows [Σ_{v∈S} p_v log(p_v/q_v) + p_t log(p_t/q_t)], q_t = Σ_{v∉S} q_v (written independently, per element)."""
    total = torch.zeros((), dtype=torch.float64)
    for row in range(student.shape[0]):
        q = [float(x) for x in torch.softmax(student[row], -1)]
        ids = [int(i) for i in targets.indices[row]]
        p = [float(x) for x in targets.probs[row]]
        q_tail = sum(q[v] for v in range(len(q)) if v not in ids)
        value = sum(pv * torch.log(torch.tensor(pv / q[i], dtype=torch.float64)) for pv, i in zip(p, ids) if pv > 0)
        p_t = float(targets.tail[row])
        if p_t > 0:
            value = value + p_t * torch.log(torch.tensor(p_t / q_tail, dtype=torch.float64))
        total = total + value
    return total


def by_hand_grad(student: torch.Tensor, targets: SparseTargets) -> torch.Tensor:
    """∂/∂z_j = q_j − p_j on S; q_j − p_t q_j / q_t off S (Σp + p_t = 1)."""
    q = torch.softmax(student, -1)
    in_top = torch.zeros_like(q, dtype=torch.bool).scatter_(-1, targets.indices, True)
    q_t = (q * ~in_top).sum(-1, keepdim=True)
    p = torch.zeros_like(q).scatter_(-1, targets.indices, targets.probs)
    return torch.where(in_top, q - p, q - targets.tail.unsqueeze(-1) * q / q_t)


def test_bucket_value_and_gradient_match_a_hand_written_float64_formula() -> None:
    student, _, targets = case()
    z = student.clone().requires_grad_()
    value = sparse_kl(z, targets, reduction="sum")  # the default tail mode is the bucket
    value.backward()
    assert value.dtype == torch.float64
    assert torch.allclose(value, by_hand(student, targets), rtol=1e-12, atol=1e-12)
    assert torch.allclose(z.grad, by_hand_grad(student, targets), rtol=1e-10, atol=1e-12)
    # the fast kernel (float32, closed-form gradient) agrees
    zf = student.float().requires_grad_()
    flat = SparseTargets(targets.indices, targets.probs.float(), targets.tail.float())
    terms = fast_sparse_kd_terms(zf, flat, None, temperature=1.0)
    terms.kd_sum.backward()
    assert float(terms.kd_sum.detach()) == pytest.approx(float(value.detach()), rel=1e-5)
    assert torch.allclose(zf.grad.double(), z.grad, atol=1e-6)


def test_bucket_with_k_equal_to_v_is_full_forward_kl() -> None:
    student, teacher, targets = case(seed=1, k=V)
    assert float(targets.tail.max()) < 1e-12
    full = forward_kl(student, teacher.log(), reduction="sum")
    assert torch.allclose(sparse_kl(student, targets, reduction="sum"), full, rtol=1e-12)
    zf = student.float()
    terms = fast_sparse_kd_terms(zf, SparseTargets(targets.indices, targets.probs.float(), targets.tail.float()), None,
                                 temperature=1.0)
    assert float(terms.kd_sum) == pytest.approx(float(full), rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_bucket_is_nonnegative_and_zero_at_the_coarsened_teacher(seed: int) -> None:
    student, _, targets = case(seed=seed, scale=3.0)
    per_row = sparse_kl(student, targets, reduction="none")
    assert bool((per_row >= -1e-12).all())
    # a student that matches the teacher on S and on the tail's total, with any shape inside the tail
    g = torch.Generator().manual_seed(100 + seed)
    shape = torch.softmax(torch.randn(student.shape, generator=g, dtype=torch.float64) * 3, -1)
    in_top = torch.zeros_like(shape, dtype=torch.bool).scatter_(-1, targets.indices, True)
    inside = shape * ~in_top
    q = inside / inside.sum(-1, keepdim=True) * targets.tail.unsqueeze(-1)
    q = q.scatter(-1, targets.indices, targets.probs)
    matched = sparse_kl(q.log() + 5.0, targets, reduction="none")  # logits up to a constant
    assert torch.allclose(matched, torch.zeros_like(matched), atol=1e-12)
    terms = fast_sparse_kd_terms(q.log().float(), SparseTargets(targets.indices, targets.probs.float(),
                                                               targets.tail.float()), None, temperature=1.0)
    assert abs(float(terms.kd_sum)) < 1e-5


def test_bucket_survives_a_confident_student() -> None:
    """q_t far below float32's 1 − Σ_S q resolution: still finite, positive, and right."""
    student, _, targets = case(seed=2)
    student = student.clone()
    student.scatter_(-1, targets.indices[:, :1], 40.0)  # q on S ≈ 1, q_t ≈ e^-40
    value = sparse_kl(student, targets, reduction="sum")
    q = torch.softmax(student, -1)
    assert float((q.sum(-1) - q.gather(-1, targets.indices).sum(-1)).max()) < 1e-14  # q_t: below float32's eps
    assert torch.isfinite(value) and torch.allclose(value, by_hand(student, targets), rtol=1e-9)
    zf = student.float().requires_grad_()
    terms = fast_sparse_kd_terms(zf, SparseTargets(targets.indices, targets.probs.float(), targets.tail.float()), None,
                                 temperature=1.0)
    terms.kd_sum.backward()
    assert float(terms.kd_sum) == pytest.approx(float(value), rel=1e-4)
    assert torch.isfinite(zf.grad).all() and torch.allclose(zf.grad.double(), by_hand_grad(student, targets), atol=1e-5)


def test_uniform_tail_equals_dense_forward_kl_of_the_uniform_decode() -> None:
    student, _, targets = case(seed=3)
    others = V - K
    dense = (targets.tail / others).unsqueeze(-1).expand(-1, V).clone().scatter_(-1, targets.indices, targets.probs)
    reference = forward_kl(student, dense.log(), reduction="sum")
    assert torch.allclose(sparse_kl(student, targets, reduction="sum", tail="uniform"), reference, rtol=1e-12)
    z = student.clone().requires_grad_()
    zr = student.clone().requires_grad_()
    sparse_kl(z, targets, reduction="sum", tail="uniform").backward()
    forward_kl(zr, dense.log(), reduction="sum").backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-12)
    zf = student.float().requires_grad_()
    terms = fast_sparse_kd_terms(zf, SparseTargets(targets.indices, targets.probs.float(), targets.tail.float()), None,
                                 temperature=1.0, tail="uniform")
    terms.kd_sum.backward()
    assert float(terms.kd_sum) == pytest.approx(float(reference), rel=1e-5)
    assert torch.allclose(zf.grad.double(), zr.grad, atol=1e-6)


def test_drop_ignores_the_tail_and_no_tail_means_no_term() -> None:
    student, _, targets = case(seed=4)
    head = SparseTargets(targets.indices, targets.probs / targets.probs.sum(-1, keepdim=True))
    plain = sparse_kl(student, head, reduction="sum")
    assert torch.allclose(sparse_kl(student, head._replace(tail=targets.tail), reduction="sum", tail="drop"), plain)
    for mode in ("bucket", "uniform"):  # targets without a tail: the modes do not matter
        assert torch.allclose(sparse_kl(student, head, reduction="sum", tail=mode), plain)
    with pytest.raises(ValueError, match="tail='spread'"):
        sparse_kl(student, targets, tail="spread")


def test_bucket_under_a_mask_and_temperature_matches_the_fast_kernel() -> None:
    student, _, targets = case(seed=5, rows=8)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    s3 = student.view(2, 4, V)
    t3 = SparseTargets(targets.indices.view(2, 4, K), targets.probs.view(2, 4, K), targets.tail.view(2, 4))
    ref = sparse_kl(s3, t3, mask.view(2, 4), temperature=2.0, reduction="sum")
    rows = SparseTargets(targets.indices[mask], targets.probs[mask].float(), targets.tail[mask].float())
    terms = fast_sparse_kd_terms(student[mask].float(), rows, None, temperature=2.0)
    assert float(terms.kd_sum) == pytest.approx(float(ref), rel=1e-5)


def test_decode_targets_carries_the_tail_unless_dropped() -> None:
    from kd_lightning.teachers.encodings import Encoding, decode_targets, encode

    g = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(2, 5, V, generator=g), -1)
    encoding = Encoding("topk", "float32", k=K)
    stored = encode(encoding, logprobs)
    bucket = decode_targets(encoding, stored)
    assert bucket.tail is not None and torch.allclose(bucket.probs.sum(-1) + bucket.tail, torch.ones(2, 5), atol=1e-5)
    top = logprobs.exp().topk(K, -1).values
    assert torch.allclose(bucket.tail, 1 - top.sum(-1), atol=1e-3)  # stored in float16
    dropped = decode_targets(encoding, stored, "drop")
    assert dropped.tail is None and torch.allclose(dropped.probs.sum(-1), torch.ones(2, 5), atol=1e-6)
    assert decode_targets(Encoding("sample", k=8, num_draws=8), encode(Encoding("sample", k=8, num_draws=8), logprobs)).tail is None


@pytest.mark.parametrize("mode", ["bucket", "uniform", "drop"])
@pytest.mark.parametrize("tailed", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_sparse_and_ce_step_matches_the_references(mode: str, tailed: bool, weighted: bool) -> None:
    """T = 1 with CE in the loss takes the fused kernel (q kept once, one gradient pass in backward):
    its sums and gradient equal sparse_kl + cross_entropy, with ignored labels, a label inside S,
    token weights and several chunks."""
    import torch.nn.functional as F

    rows = 37
    student, _, targets = case(seed=6, rows=rows)
    probs = targets.probs if tailed else targets.probs / targets.probs.sum(-1, keepdim=True)
    targets = SparseTargets(targets.indices, probs, targets.tail if tailed else None)
    g = torch.Generator().manual_seed(7)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[3] = -100
    labels[5] = targets.indices[5, 0]
    weight = torch.rand(rows, generator=g, dtype=torch.float64) if weighted else torch.ones(rows, dtype=torch.float64)
    z = student.clone().requires_grad_()
    kd_ref = (sparse_kl(z, targets, reduction="none", tail=mode) * weight).sum()
    ce_ref = F.cross_entropy(z, labels, reduction="sum")
    (0.3 * kd_ref + 0.7 * ce_ref).backward()
    zf = student.float().requires_grad_()
    flat = SparseTargets(targets.indices, targets.probs.float(), None if targets.tail is None else targets.tail.float())
    terms = fast_sparse_kd_terms(zf, flat, labels, temperature=1.0, ce=True, tail=mode, chunk_tokens=10,
                                 token_weight=weight.float() if weighted else None)
    (0.3 * terms.kd_sum + 0.7 * terms.ce_sum).backward()
    assert float(terms.kd_sum.detach()) == pytest.approx(float(kd_ref.detach()), rel=1e-5)
    assert float(terms.ce_sum.detach()) == pytest.approx(float(ce_ref.detach()), rel=1e-5)
    assert torch.allclose(zf.grad.double(), z.grad, atol=1e-6)
    assert terms.teacher_token_ce is None and terms.student_token_ce.shape == (rows,)
    assert float(terms.student_token_ce[3]) == 0.0

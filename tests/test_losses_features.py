"""FitNets hint loss and RKD losses against plain-Python references and their invariances."""

from __future__ import annotations

import math

import pytest
import torch

import kd_lightning.losses as L


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def distance_ref(points: list[list[float]]) -> list[list[float]]:
    n = len(points)
    d = [[math.dist(points[i], points[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
    positive = [x for row in d for x in row if x > 0]
    mean = sum(positive) / len(positive)
    return [[x / mean for x in row] for row in d]


def rkd_distance_ref(student: torch.Tensor, teacher: torch.Tensor) -> float:
    ds, dt = distance_ref(student.tolist()), distance_ref(teacher.tolist())
    n = len(ds)
    return sum(huber(ds[i][j] - dt[i][j]) for i in range(n) for j in range(n)) / n**2


def cosine_at_anchor(points, i, j, k) -> float:
    u = [a - b for a, b in zip(points[i], points[j])]
    v = [a - b for a, b in zip(points[k], points[j])]
    nu, nv = math.hypot(*u), math.hypot(*v)
    if nu == 0 or nv == 0:
        return 0.0  # a zero difference vector normalises to zero
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def rkd_angle_ref(student: torch.Tensor, teacher: torch.Tensor) -> float:
    s, t, n = student.tolist(), teacher.tolist(), student.shape[0]
    total = sum(huber(cosine_at_anchor(s, i, j, k) - cosine_at_anchor(t, i, j, k))
                for i in range(n) for j in range(n) for k in range(n))
    return total / n**3


def embeddings(n=6, ds=4, dt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, ds, generator=gen, dtype=torch.float64), torch.randn(n, dt, generator=gen, dtype=torch.float64)


def random_rotation(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------------------------
# FitNets
# ----------------------------------------------------------------------------------------------
def test_hint_mse_reference_and_mask():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(L.hint_mse(student, teacher), torch.nn.functional.mse_loss(student, teacher))
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, False]])
    rows = [(s, t) for s, t, m in zip(student.reshape(-1, 4).tolist(), teacher.reshape(-1, 4).tolist(),
                                      mask.reshape(-1).tolist()) if m]
    want = sum(sum((a - b) ** 2 for a, b in zip(s, t)) / 4 for s, t in rows) / len(rows)
    assert L.hint_mse(student, teacher, mask).item() == pytest.approx(want, rel=1e-12)
    changed = torch.where(mask[..., None], student, torch.full_like(student, float("nan")))
    torch.testing.assert_close(L.hint_mse(changed, teacher, mask), L.hint_mse(student, teacher, mask))
    empty = L.hint_mse(student.requires_grad_(True), teacher, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_hint_mse_projection():
    assert isinstance(L.make_projection(8, 8), torch.nn.Identity)
    projection = L.make_projection(3, 5)
    assert isinstance(projection, torch.nn.Linear) and projection.weight.shape == (5, 3)
    student = torch.randn(4, 7, 3, requires_grad=True)
    teacher = torch.randn(4, 7, 5, requires_grad=True)
    with pytest.raises(ValueError, match="make_projection"):
        L.hint_mse(student, teacher)
    loss = L.hint_mse(student, teacher, projection=projection)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(projection(student), teacher.detach()))
    loss.backward()
    assert projection.weight.grad is not None and student.grad is not None and teacher.grad is None


# ----------------------------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------------------------
def test_rkd_matches_reference():
    student, teacher = embeddings()
    assert L.rkd_distance(student, teacher).item() == pytest.approx(rkd_distance_ref(student, teacher), rel=1e-9)
    assert L.rkd_angle(student, teacher).item() == pytest.approx(rkd_angle_ref(student, teacher), rel=1e-9)
    # Widely spread embeddings exercise the linear part of the Huber loss.
    assert L.rkd_distance(student * torch.tensor([1.0, 30, 1, 1], dtype=torch.float64), teacher).item() == \
        pytest.approx(rkd_distance_ref(student * torch.tensor([1.0, 30, 1, 1], dtype=torch.float64), teacher))


@pytest.mark.parametrize("loss", [L.rkd_distance, L.rkd_angle])
def test_rkd_similarity_invariance(loss):
    student, teacher = embeddings()
    rotation = random_rotation(4)
    value = loss(student, teacher)
    assert value > 1e-3
    transformed = 3.7 * student @ rotation + torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    torch.testing.assert_close(loss(transformed, teacher), value)
    # Zero when the student is a similarity transform of the teacher (here in a wider space).
    embedded = torch.cat([teacher, torch.zeros(6, 1, dtype=torch.float64)], dim=1)
    assert loss(0.2 * embedded @ rotation + 5.0, teacher).item() < 1e-12


@pytest.mark.parametrize("loss", [L.rkd_distance, L.rkd_angle])
def test_rkd_gradients(loss):
    student, teacher = embeddings()
    student[3] = student[1]  # coincident points: zero distances must not give NaN gradients
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0 and teacher.grad is None
    s, t = embeddings(n=4, seed=3)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s.requires_grad_(True),))


def test_rkd_angle_chunked_matches_full():
    student, teacher = embeddings(n=9)
    student.requires_grad_(True)
    full = L.rkd_angle(student, teacher)
    (grad_full,) = torch.autograd.grad(full, student)
    chunked = L.rkd_angle(student, teacher, anchor_chunk=4)
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(grad_chunked, grad_full)
    with pytest.raises(ValueError, match="anchor_chunk"):
        L.rkd_angle(student, teacher, anchor_chunk=0)

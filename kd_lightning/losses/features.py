"""Feature-based distillation: FitNets hints and Relational KD (distance and angle)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kd_lightning.losses.common import Reduction, check_mask, counted_rows, reduce_positions, upcast


def make_projection(student_dim: int, teacher_dim: int) -> nn.Module:
    """FitNets regressor for ``[..., D]`` features: ``nn.Linear`` when widths differ, else Identity.

    The returned module holds trainable parameters: register it on the student side so the optimizer
    sees it.
    """
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim)


def hint_mse(
    student_features: Tensor,
    teacher_features: Tensor,
    mask: Tensor | None = None,
    *,
    projection: nn.Module | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """FitNets hint loss: ``mean_d (r(F_S) − F_T)²`` per position, token-mean over counted positions.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets". Features are ``[..., D]`` (feature dim
    last; permute conv maps to channels-last first); ``projection`` (see :func:`make_projection`)
    maps the student width to the teacher's. Without a mask this equals ``F.mse_loss`` (mean over all
    elements). The teacher is detached.
    """
    if projection is not None:
        student_features = projection(student_features)
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} and teacher features "
            f"{tuple(teacher_features.shape)} differ; pass projection=make_projection(student_dim, teacher_dim)"
        )
    lead = student_features.shape[:-1]
    mask = check_mask(mask, lead)
    diff = upcast(counted_rows(student_features, mask)) - upcast(counted_rows(teacher_features.detach(), mask))
    return reduce_positions(diff.square().mean(-1), mask, lead, reduction)


def _normalized_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise Euclidean distances divided by their mean over distinct, non-coincident pairs."""
    sq = e.square().sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp_min(eps)
    off_diagonal = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    d = torch.where(off_diagonal, d2.sqrt(), torch.zeros_like(d2))
    positive = d > 0
    return d / d[positive].mean() if positive.any() else d


def rkd_distance(student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
    """RKD distance loss: Huber(δ=1) between mean-normalised pairwise distances, mean over n² pairs.

    Park et al. 2019, "Relational Knowledge Distillation". ``ψ_D(i,j) = ‖e_i − e_j‖ / μ`` with μ the
    mean non-zero distance of the batch. Embeddings are pooled ``[n, d]``; student and teacher widths
    may differ. Invariant to scaling, translation and rotation of either embedding space.
    """
    with torch.no_grad():
        teacher = _normalized_distances(upcast(teacher_embeddings))
    student = _normalized_distances(upcast(student_embeddings))
    return F.smooth_l1_loss(student, teacher)


def _angles(e: Tensor, anchors: slice) -> Tensor:
    """``⟨u(e_i − e_j), u(e_k − e_j)⟩`` for anchors j in ``anchors``: shape [len(anchors), n, n]."""
    u = F.normalize(e[None, :, :] - e[anchors, None, :], p=2, dim=-1)
    return u @ u.transpose(1, 2)


def _angle_chunk_loss(student: Tensor, teacher: Tensor, start: int, stop: int) -> Tensor:
    with torch.no_grad():
        target = _angles(teacher, slice(start, stop))
    return F.smooth_l1_loss(_angles(student, slice(start, stop)), target, reduction="sum")


def rkd_angle(student_embeddings: Tensor, teacher_embeddings: Tensor, *, anchor_chunk: int | None = None) -> Tensor:
    """RKD angle loss: Huber(δ=1) between cosines of the angle at every anchor, mean over n³ triplets.

    Park et al. 2019, "Relational Knowledge Distillation". ``ψ_A(i,j,k) = ⟨u_ij, u_kj⟩`` with
    ``u_ij = (e_i − e_j)/‖e_i − e_j‖`` (a zero vector when i = j). The full tensor is O(n³); with
    ``anchor_chunk`` the anchors are processed in chunks under activation checkpointing, so memory is
    O(anchor_chunk · n²) in forward and backward (advised for n > 256).
    """
    student, teacher = upcast(student_embeddings), upcast(teacher_embeddings)
    n = student.shape[0]
    step = n if anchor_chunk is None else anchor_chunk
    if step < 1:
        raise ValueError(f"anchor_chunk must be >= 1, got {anchor_chunk}")
    total = student.new_zeros(())
    for start in range(0, n, step):
        stop = min(start + step, n)
        if anchor_chunk is None or not torch.is_grad_enabled():
            total = total + _angle_chunk_loss(student, teacher, start, stop)
        else:
            total = total + checkpoint(_angle_chunk_loss, student, teacher, start, stop, use_reentrant=False)
    return total / max(n, 1) ** 3

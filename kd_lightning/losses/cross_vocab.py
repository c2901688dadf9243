"""Losses that compare teacher and student distributions over *different* vocabularies."""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses.common import token_divergence


@token_divergence(same_vocab=False)
def uld(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Universal Logit Distillation: L1 distance between sorted probability vectors.

    Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
    for LLMs". Per position ``Σ_v |sort↓(q)_v − sort↓(p)_v|`` with the smaller vocabulary zero-padded
    (the paper's closed form of Wasserstein-1 under its cost assumption); ∈ [0, 2], invariant to any
    permutation of either vocabulary. Student vocab ``Vs`` and teacher vocab ``Vt`` may differ; the
    leading dims must match: positions are aligned *by index*, so the caller cuts both answer spans
    to a common length and passes the mask of positions to compare. The reference code averages per
    sequence then over the batch: use ``reduction="seq_mean"`` for that; the default is token-mean.
    """
    q = log_q.exp().sort(dim=-1, descending=True).values
    p = log_p.exp().sort(dim=-1, descending=True).values
    # Zero-padding the shorter vocabulary at the end keeps both vectors sorted (probabilities ≥ 0).
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)

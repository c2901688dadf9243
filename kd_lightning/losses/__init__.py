"""Pure-function distillation losses (no Lightning import anywhere in this package).

Token-level divergence contract::

    fn(student_logits [..., V], teacher_logits [..., V], mask [...] | None = None, *,
       temperature=1.0, reduction="mean", **params) -> Tensor

- ``mask`` is bool, True = the position counts; logits are already aligned (for causal LMs,
  ``kd_lightning.tasks.CausalLM.align`` shifts them; the losses never shift themselves).
- ``reduction``: "mean" (token-mean of the per-position divergence summed over V), "sum", "none"
  (shape ``[...]``, exact zeros at masked positions), "seq_mean". With no counted position "mean"
  returns 0 with a graph (no NaN, no warning; the module decides whether to warn).
- Both logits are divided by ``temperature``; no T² factor (the caller applies it).
- float32 log-space internally whatever the input dtype; finite with −inf teacher logits.
- Only the student gets gradient (the teacher is detached inside).
"""

from kd_lightning.losses.adaptive import adaptive_kl, taid
from kd_lightning.losses.chunked import chunked_distill_loss, chunked_kd_terms
from kd_lightning.losses.common import log_probs, masked_mean
from kd_lightning.losses.cross_vocab import CrossTokenTargets, cross_token_targets, span_kl, uld, uld_index_aligned
from kd_lightning.losses.divergences import (
    forward_kl,
    generalized_jsd,
    jensen_shannon,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from kd_lightning.losses.likelihood import alm, binary_divergence
from kd_lightning.losses.next_byte import byte_kl, next_byte_distribution
from kd_lightning.losses.projection import projected_kl, xtoken_kl
from kd_lightning.losses.fast import KDTerms, fast_kd_terms, fast_sparse_kd_terms, supports_fast
from kd_lightning.losses.features import hint_mse, make_projection, rkd_angle, rkd_distance
from kd_lightning.losses.sparse import SparseTargets, online_sparse_kl, sample_targets, sparse_kl, topk_targets

__all__ = [
    "CrossTokenTargets",
    "KDTerms",
    "fast_kd_terms",
    "fast_sparse_kd_terms",
    "supports_fast",
    "SparseTargets",
    "adaptive_kl",
    "alm",
    "binary_divergence",
    "byte_kl",
    "next_byte_distribution",
    "chunked_distill_loss",
    "chunked_kd_terms",
    "cross_token_targets",
    "forward_kl",
    "generalized_jsd",
    "hint_mse",
    "jensen_shannon",
    "log_probs",
    "make_projection",
    "masked_mean",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "sample_targets",
    "skew_kl",
    "skew_reverse_kl",
    "span_kl",
    "sparse_kl",
    "online_sparse_kl",
    "taid",
    "topk_targets",
    "total_variation",
    "uld",
    "uld_index_aligned",
    "projected_kl",
    "xtoken_kl",
]

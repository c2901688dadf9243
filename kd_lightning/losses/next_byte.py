"""Exact next-byte targets from a sub-word teacher for a byte-level student (``loss=byte_kl``).

A teacher's distribution over its tokens at a token boundary implies a distribution over the next
byte: the probability that the next byte is ``b`` is the mass of the teacher tokens whose bytes start
with ``b`` (plus EOS as its own outcome). Inside a teacher token, after its first ``k`` bytes ``u``,
the next byte is read off the same distribution conditioned on the prefix: the mass of the tokens
that start with ``u + b`` over the mass of the tokens that strictly extend ``u``. A byte student can
then take a full forward KL over the 256 bytes (and EOS) at every position, instead of matching a
sub-word distribution it cannot represent. This is the byte-prefix view of "byte-prefix mapping"
(arXiv 2607.22334, from its description; no code was read) restricted to the byte case; the code is
ours.

Approximation (stated, not hidden): within a token, the teacher's probability of tokens that *end*
exactly at the prefix (and would continue with another token) is dropped by the renormalisation;
counting it would need the teacher's distribution after a tokenization of the prefix it never saw.
At token boundaries the marginal is exact.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kd_lightning.losses.align import NextByteMap, counted_groups
from kd_lightning.losses.common import log_probs
from kd_lightning.losses.cross_vocab import IGNORE_INDEX, CrossTokenTargets

BYTE_OUTCOMES = 257  # 256 bytes and EOS


def next_byte_distribution(teacher_log_probs: Tensor, nodes: Tensor, next_byte: NextByteMap) -> Tensor:
    """``[N, 257]`` next-byte probabilities from teacher rows ``[N, Vt]`` (log-probabilities) at the
    prefix nodes ``nodes [N]``: ``P(b | u) = Σ_{v ⊐ u·b} p(v) / Σ_{v ⊐ u} p(v)`` (``⊐``: the bytes of
    ``v`` start with, and are longer than, the prefix); EOS (outcome 256) only at the empty prefix.
    A row whose prefix has no mass at all is uniform."""
    device = teacher_log_probs.device
    node_ptr = next_byte.node_ptr.to(device)
    starts, counts = node_ptr[nodes], node_ptr[nodes + 1] - node_ptr[nodes]
    position = torch.repeat_interleave(torch.arange(len(nodes), device=device), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    entry = starts[position] + torch.arange(len(position), device=device) - first
    mass = teacher_log_probs[position, next_byte.entry_token.to(device)[entry]].exp()
    target = teacher_log_probs.new_zeros(len(nodes), BYTE_OUTCOMES)
    target.index_put_((position, next_byte.entry_byte.to(device)[entry]), mass, accumulate=True)
    total = target.sum(-1, keepdim=True)
    return torch.where(total > 0, target / total.clamp_min(torch.finfo(target.dtype).tiny),
                       torch.full_like(target, 1.0 / BYTE_OUTCOMES))


def byte_positions(targets: CrossTokenTargets, student_mask: Tensor) -> tuple[list[tuple[int, int, int, int]], int]:
    """``(row, student position, teacher position, prefix node)`` for every counted student byte
    inside a chunk (:func:`~kd_lightning.losses.align.counted_groups`), walking each chunk's teacher
    tokens byte by byte; and the number of counted student positions. A chunk whose teacher bytes
    do not add up to its student bytes is left out."""
    assert targets.next_byte is not None and targets.student_labels is not None
    assert targets.student_offsets is not None and targets.teacher_offsets is not None
    lengths = targets.next_byte.token_length.tolist()
    prefix_node = targets.next_byte.prefix_node
    s_counted_t = student_mask.cpu() & (targets.student_labels.cpu() != IGNORE_INDEX)
    s_counted, t_labels = s_counted_t.tolist(), targets.teacher_labels.cpu().tolist()
    t_counted = [[label != IGNORE_INDEX for label in row] for row in t_labels]
    found: list[tuple[int, int, int, int]] = []
    for row, (s_off, t_off) in enumerate(zip(targets.student_offsets.cpu(), targets.teacher_offsets.cpu())):
        for g in counted_groups(s_off, t_off, s_counted[row], t_counted[row]):
            tokens = t_labels[row][g.teacher_start:g.teacher_end]
            if any(not 0 <= v < len(lengths) or lengths[v] == 0 for v in tokens) \
                    or sum(lengths[v] for v in tokens) != g.student_end - g.student_start:
                continue
            position = g.student_start
            for offset, token in enumerate(tokens):
                for depth in range(lengths[token]):
                    found.append((row, position, g.teacher_start + offset, int(prefix_node[token, depth])))
                    position += 1
    return found, int(s_counted_t.sum())


def byte_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    targets: CrossTokenTargets | None = None,
    temperature: float = 1.0,
    reduction: Literal["mean", "sum"] = "mean",
    out_stats: dict[str, float] | None = None,
) -> Tensor:
    """Forward KL from the teacher's exact next-byte distribution to a byte student's.

    For each counted student byte ``i`` covered by teacher token ``v`` (predicted by teacher row
    ``j``) after its first ``k`` bytes ``u``: ``P_i = next_byte_distribution(log_softmax(t_j / T), u)``
    over 257 outcomes, and ``KL(P_i ‖ q_i) = Σ_b P_i(b) (log P_i(b) − log q_i(id_b))`` with
    ``q_i = softmax(s_i / T)`` over the student's whole vocabulary (ids ``targets.next_byte.
    student_ids``; mass the student puts on pad/unk is only penalised through ``log q``). "mean" over
    the compared positions (0 with a graph when none). With the byte tokenizer on both sides this is
    plain forward KL on the 257 ids. ``out_stats`` receives ``compared_fraction`` (compared / counted
    student positions).
    """
    if targets is None or targets.next_byte is None:
        raise ValueError("byte_kl needs a byte-level student and targets with a NextByteMap "
                         "(kd_lightning.data.vocab_map.build_next_byte_map; the run builds it when the student reads bytes)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"byte_kl supports reduction 'mean' or 'sum', got {reduction!r}")
    device = student_logits.device
    student_mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    found, counted = byte_positions(targets, student_mask)
    if out_stats is not None:
        out_stats.update(compared_fraction=len(found) / max(counted, 1))
    if not found:
        return student_logits.sum() * 0.0
    index = torch.tensor(found, dtype=torch.long)
    with torch.no_grad():
        teacher = teacher_logits.detach()
        rows = teacher[index[:, 0].to(teacher.device), index[:, 2].to(teacher.device)]
        target = next_byte_distribution(log_probs(rows, temperature), index[:, 3].to(teacher.device),
                                        targets.next_byte).to(device)
    student_rows = log_probs(student_logits[index[:, 0].to(device), index[:, 1].to(device)], temperature)
    log_q = student_rows[:, targets.next_byte.student_ids.to(device)]
    values = (torch.xlogy(target, target) - target * log_q).sum(-1)
    total = values.sum()
    return total if reduction == "sum" else total / len(found)

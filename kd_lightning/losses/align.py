"""Aligning two tokenizations of the same text: character-span groups and the shared-vocabulary map.

Pure Python/torch: functions of offsets and tensors, no tokenizer, no file, no cache. Building a
:class:`VocabMap` from two tokenizers (and caching it on disk) is the data side's job
(:func:`kd_lightning.data.vocab_map.shared_vocab_map`).

Offsets are **character** offsets into the text (Python ``str`` indices, what fast tokenizers return with
``return_offsets_mapping=True``), one ``(start, end)`` per token; ``kd_lightning.data.dual`` produces
them for every tokenizer, including the byte tokenizer. Tokens that cover only part of a character
(a byte-level token holding 2 of the 3 bytes of "€") carry the whole character's span, so several
tokens may share one span; zero-width tokens (EOS at the end of a document: ``(n, n)``) are allowed.
Padding rows have offsets ``(-1, -1)`` and end a sequence.

The idea of grouping tokens between shared character boundaries follows the token alignment of
"Dual-Space Knowledge Distillation for Large Language Models" (Zhang et al., 2024) and the
cross-tokenizer mode of TRL's GOLD trainer; the code here is written from that description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

Offsets = Tensor | Sequence[Sequence[int]]


class SpanGroup(NamedTuple):
    """Tokens ``[student_start, student_end)`` and ``[teacher_start, teacher_end)`` cover the same
    characters ``[char_start, char_end)``; both tokenizations have a boundary at each end."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    char_start: int
    char_end: int

    @property
    def one_to_one(self) -> bool:
        return self.student_end - self.student_start == 1 and self.teacher_end - self.teacher_start == 1


def _as_pairs(offsets: Offsets) -> list[tuple[int, int]]:
    rows = offsets.tolist() if isinstance(offsets, Tensor) else [list(row) for row in offsets]
    pairs = []
    for start, end in rows:
        if start < 0:  # padding: the sequence ends here
            break
        pairs.append((int(start), int(end)))
    return pairs


def token_cuts(offsets: Offsets) -> list[tuple[int, int]]:
    """Boundaries of one tokenization as ``(char_offset, tokens_before)``, in order.

    The start of the first token is a boundary; after token ``i`` there is a boundary at ``c`` when
    every token up to ``i`` ends at or before ``c`` (``c`` = the largest end so far) and the next token
    starts at or after ``c``. Overlapping tokens (the bytes of one character) therefore never get a
    boundary between them, and a zero-width token gives two boundaries at the same offset.
    """
    pairs = _as_pairs(offsets)
    if not pairs:
        return []
    cuts = [(pairs[0][0], 0)]
    reach = pairs[0][0]
    for index, (_, end) in enumerate(pairs):
        reach = max(reach, end)
        next_start = pairs[index + 1][0] if index + 1 < len(pairs) else reach
        if next_start >= reach:
            cuts.append((reach, index + 1))
    return cuts


def span_groups(student_offsets: Offsets, teacher_offsets: Offsets) -> list[SpanGroup]:
    """Groups of consecutive tokens that end, in both tokenizations, at the same character offset.

    Shared boundaries are the character offsets that are a boundary (:func:`token_cuts`) of both
    sides; several boundaries at one offset (zero-width tokens) pair up in order. Each group runs
    from one shared boundary to the next, so the text before a group is the same for both
    tokenizations. Tokens before the first shared boundary (e.g. after a causal shift the first
    targets may start at different offsets) or after the last belong to no group.
    """
    student, teacher = token_cuts(student_offsets), token_cuts(teacher_offsets)
    shared: list[tuple[int, int, int]] = []  # (char, student tokens before, teacher tokens before)
    i = j = 0
    while i < len(student) and j < len(teacher):
        if student[i][0] < teacher[j][0]:
            i += 1
        elif student[i][0] > teacher[j][0]:
            j += 1
        else:
            shared.append((student[i][0], student[i][1], teacher[j][1]))
            i, j = i + 1, j + 1
    return [
        SpanGroup(s0, s1, t0, t1, c0, c1)
        for (c0, s0, t0), (c1, s1, t1) in zip(shared, shared[1:])
        if s1 > s0 or t1 > t0
    ]


def counted_groups(student_offsets: Offsets, teacher_offsets: Offsets, student_counted: Sequence[bool],
                   teacher_counted: Sequence[bool]) -> list[SpanGroup]:
    """The :func:`span_groups` of one sequence with at least one token on each side, all of them
    counted (``*_counted[i]``: target token ``i`` is in the loss); the chunks that likelihood-based
    cross-tokenizer losses compare (a group with a prompt or padding token is left out whole)."""
    return [g for g in span_groups(student_offsets, teacher_offsets)
            if g.student_end > g.student_start and g.teacher_end > g.teacher_start
            and all(student_counted[g.student_start:g.student_end])
            and all(teacher_counted[g.teacher_start:g.teacher_end])]


# ----------------------------------------------------------------------------------------------
# Shared vocabulary
# ----------------------------------------------------------------------------------------------
class VocabMap(NamedTuple):
    """Token ``student_ids[k]`` and token ``teacher_ids[k]`` stand for the same byte string
    (built by :func:`kd_lightning.data.vocab_map.shared_vocab_map`)."""

    student_ids: Tensor  # [K] int64
    teacher_ids: Tensor  # [K] int64

    def lookup(self, student_vocab_size: int) -> Tensor:
        """``[student_vocab_size]`` int64: position ``k`` in the map of each student id, -1 if absent."""
        table = torch.full((student_vocab_size,), -1, dtype=torch.long)
        keep = self.student_ids < student_vocab_size
        table[self.student_ids[keep]] = torch.arange(len(self.student_ids))[keep]
        return table


class NextByteMap(NamedTuple):
    """What a byte-level student needs to read the next byte off a sub-word teacher's distribution
    (built by :func:`kd_lightning.data.vocab_map.build_next_byte_map`).

    A *node* is a proper prefix (possibly empty, node 0) of some teacher token's bytes. Entries
    ``node_ptr[u]:node_ptr[u+1]`` list the teacher tokens that strictly extend prefix ``u``
    (``entry_token``) and the byte that follows ``u`` in each (``entry_byte``, 0..255; 256 = EOS,
    an entry of the empty prefix only). ``prefix_node[v, k]`` is the node of the first ``k`` bytes
    of token ``v`` (-1 past its length), ``token_length[v]`` its bytes (EOS 1, other specials 0),
    ``student_ids[b]`` the student's id of byte ``b`` (``student_ids[256]``: its EOS).
    """

    node_ptr: Tensor  # [N + 1] int64
    entry_token: Tensor  # [E] int64
    entry_byte: Tensor  # [E] int64
    prefix_node: Tensor  # [Vt, max token bytes] int64
    token_length: Tensor  # [Vt] int64
    student_ids: Tensor  # [257] int64


class VocabProjection(NamedTuple):
    """A sparse map from student tokens to teacher tokens (X-Token's projection ``W``, built by
    :func:`kd_lightning.data.vocab_projection.shared_vocab_projection`).

    Entry ``n`` says: student token ``student_ids[n]`` sends the share ``weights[n]`` of its
    probability to teacher token ``teacher_ids[n]``; a student token's weights sum to 1 (a student
    token without entries sends nothing). ``teacher_fold[j]`` is the teacher token that teacher
    token ``j``'s probability is counted on when the loss folds uncovered teacher tokens (``j``
    itself when some student token projects onto it, else its longest byte prefix that is; -1: none).
    """

    student_ids: Tensor  # [N] int64
    teacher_ids: Tensor  # [N] int64
    weights: Tensor  # [N] float64
    teacher_fold: Tensor  # [Vt] int64

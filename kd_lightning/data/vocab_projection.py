"""X-Token's student -> teacher vocabulary projection, built from two tokenizers (``loss=xtoken_kl``).

The data side of :func:`kd_lightning.losses.xtoken_kl`: reads the tokenizers, returns a
:class:`~kd_lightning.losses.align.VocabProjection` of tensors. Rule (X-Token, arXiv 2605.21699, as
its paper and NeMo-RL's ``minimal_projection_via_multitoken`` describe it; the code is ours):

1. a student token whose byte-normalised string (:func:`~kd_lightning.data.vocab_map.token_bytes`:
   ``Ġ``/``▁``/``<0xNN>`` spellings mapped to raw bytes) is a teacher token maps to it with weight 1
   (exact match); EOS, BOS, pad and unk map to the teacher's token of the same role;
2. any other student token's string is re-tokenised with the teacher's tokenizer into
   ``t_1 … t_k``; the first ``top_k`` pieces get weights ``decay^(i-1)``, normalised to sum 1
   (front-loaded: the teacher's next-token distribution is about the first piece). A string the
   teacher's tokenizer does not reproduce byte for byte (part of a UTF-8 character, a normaliser
   that rewrites it) is cut greedily into the longest teacher tokens instead.

``teacher_fold`` (our addition, see :mod:`kd_lightning.losses.projection`) sends every teacher token
to its longest byte prefix that some student token projects onto.
"""

from __future__ import annotations

from typing import Any

import torch

from kd_lightning.data.tokenizer import is_byte_tokenizer, tokenizer_identity
from kd_lightning.data.vocab_map import token_bytes
from kd_lightning.losses.align import VocabProjection

ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


def _greedy_pieces(value: bytes, by_bytes: dict[bytes, int], longest: int) -> list[int] | None:
    """``value`` cut left to right into the longest teacher tokens; None when some byte has none."""
    pieces, start = [], 0
    while start < len(value):
        for end in range(min(len(value), start + longest), start, -1):
            if value[start:end] in by_bytes:
                pieces.append(by_bytes[value[start:end]])
                start = end
                break
        else:
            return None
    return pieces


def build_vocab_projection(student_tokenizer: Any, teacher_tokenizer: Any, *, decay: float = 0.5,
                           top_k: int = 4) -> VocabProjection:
    """The projection of every student token onto teacher tokens (rules in the module docstring)."""
    if not 0.0 <= decay <= 1.0 or top_k < 1:
        raise ValueError(f"decay must be in [0, 1] and top_k >= 1, got decay={decay}, top_k={top_k}")
    teacher_bytes = token_bytes(teacher_tokenizer)
    by_bytes: dict[bytes, int] = {}
    for token_id, value in sorted(teacher_bytes.items()):
        by_bytes.setdefault(value, token_id)
    longest = max([1, *(len(value) for value in by_bytes)])
    entries: dict[int, list[int]] = {}
    for role in ROLES:
        student_id, teacher_id = getattr(student_tokenizer, role, None), getattr(teacher_tokenizer, role, None)
        if student_id is not None and teacher_id is not None:
            entries.setdefault(int(student_id), [int(teacher_id)])
    pending: dict[int, bytes] = {}
    for token_id, value in token_bytes(student_tokenizer).items():
        if token_id in entries:
            continue
        if value in by_bytes:
            entries[token_id] = [by_bytes[value]]
        elif value not in (b"<eos>", b"<bos>"):
            pending[token_id] = value
    texts = {}
    for token_id, value in pending.items():
        try:
            texts[token_id] = value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    ids = [] if is_byte_tokenizer(teacher_tokenizer) else list(texts)  # bytes: the greedy cut is its tokenization
    encoded = teacher_tokenizer([texts[i] for i in ids], add_special_tokens=False)["input_ids"] if ids else []
    retokenised = dict(zip(ids, encoded))
    for token_id, value in pending.items():
        pieces = retokenised.get(token_id)
        if pieces is None or b"".join(teacher_bytes.get(piece, b"\0<none>") for piece in pieces) != value:
            pieces = _greedy_pieces(value, by_bytes, longest)
        if pieces:
            entries[token_id] = list(pieces)
    student_ids, teacher_ids, weights = [], [], []
    for token_id, pieces in sorted(entries.items()):
        shares: dict[int, float] = {}
        for rank, piece in enumerate(pieces[:top_k]):
            shares[piece] = shares.get(piece, 0.0) + decay ** rank  # 0 ** 0 == 1: decay=0 keeps the first piece
        total = sum(shares.values())
        for piece, share in sorted(shares.items()):
            student_ids.append(token_id)
            teacher_ids.append(piece)
            weights.append(share / total)
    covered = set(teacher_ids)
    teacher_vocab = max([len(teacher_tokenizer), *(i + 1 for i in teacher_bytes)])
    fold = torch.full((teacher_vocab,), -1, dtype=torch.long)
    for token_id in covered:
        fold[token_id] = token_id
    for token_id, value in teacher_bytes.items():
        if token_id in covered or value in (b"<eos>", b"<bos>"):
            continue
        for end in range(len(value), 0, -1):
            prefix = by_bytes.get(value[:end])
            if prefix in covered:
                fold[token_id] = prefix
                break
    return VocabProjection(torch.tensor(student_ids, dtype=torch.long), torch.tensor(teacher_ids, dtype=torch.long),
                           torch.tensor(weights, dtype=torch.float64), fold)


# Projections built in this process, by both tokenizers' identities: a sweep builds each pair once.
_PROJECTIONS: dict[tuple[str, str], VocabProjection] = {}


def shared_vocab_projection(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabProjection:
    """:func:`build_vocab_projection` with its defaults, once per tokenizer pair and process (about a
    second for 8k student tokens against a 49k teacher, so it is not kept on disk)."""
    key = (tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer))
    if key not in _PROJECTIONS:
        _PROJECTIONS[key] = build_vocab_projection(student_tokenizer, teacher_tokenizer)
    return _PROJECTIONS[key]

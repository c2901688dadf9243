"""Aligning two tokenizations of the same text: character-span groups and a shared vocabulary.

Pure Python/torch (no Lightning, no tokenizer calls in the hot path). Offsets are **character**
offsets into the text (Python ``str`` indices, what fast tokenizers return with
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

import hashlib
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

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


# ----------------------------------------------------------------------------------------------
# Shared vocabulary
# ----------------------------------------------------------------------------------------------
class VocabMap(NamedTuple):
    """Token ``student_ids[k]`` and token ``teacher_ids[k]`` stand for the same byte string."""

    student_ids: Tensor  # [K] int64
    teacher_ids: Tensor  # [K] int64

    def lookup(self, student_vocab_size: int) -> Tensor:
        """``[student_vocab_size]`` int64: position ``k`` in the map of each student id, -1 if absent."""
        table = torch.full((student_vocab_size,), -1, dtype=torch.long)
        keep = self.student_ids < student_vocab_size
        table[self.student_ids[keep]] = torch.arange(len(self.student_ids))[keep]
        return table


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (byte-level BPE writes ``Ġ`` for 0x20)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _backend_kinds(tokenizer: Any) -> tuple[str | None, str | None]:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [step.get("type") for step in decoder.get("decoders", []) or []]
    model = (spec.get("model") or {}).get("type")
    return ("ByteLevel" if "ByteLevel" in kinds else "Metaspace" if "Metaspace" in kinds else None), model


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """The UTF-8 byte string each ordinary token stands for, by id; special tokens are keyed by role.

    Normalisation, so that equal text gives equal keys whatever the tokenizer's spelling:
    byte-level BPE (GPT-2 style, ``Ġ`` = space) is mapped back through its byte table; SentencePiece
    style (``▁`` = space, ``<0xNN>`` byte fallback) is mapped to spaces and bytes; the byte tokenizer
    (ByT5) maps id ``b + 3`` to byte ``b``; anything else is its token string in UTF-8. EOS and BOS
    become the keys ``b"<eos>"`` / ``b"<bos>"`` on both sides (they match each other whatever they
    are called); other special tokens (pad, unk, added control tokens) are left out. A
    SentencePiece word-initial ``▁`` is a space even where the tokenizer invented it (prefix space at
    the start of a text): such a token then fails the exact-match check in ``span_kl`` and falls back
    to ULD, which is the safe side.
    """
    from kd_lightning.data.tokenizer import BYTE_OFFSET, is_byte_tokenizer

    special_roles = {tokenizer.eos_token_id: b"<eos>", tokenizer.bos_token_id: b"<bos>"}
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    found: dict[int, bytes] = {}
    if is_byte_tokenizer(tokenizer):
        found = {byte + BYTE_OFFSET: bytes([byte]) for byte in range(256)}
    else:
        kind, _ = _backend_kinds(tokenizer)
        table = _byte_level_decoder() if kind == "ByteLevel" else None
        for token, token_id in tokenizer.get_vocab().items():
            if token_id in special_ids:
                continue
            if table is not None:
                if all(char in table for char in token):
                    found[token_id] = bytes(table[char] for char in token)
                continue
            if kind == "Metaspace" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                found[token_id] = bytes([int(token[3:5], 16)])
                continue
            # surrogatepass: a vocabulary may hold half of a UTF-16 pair (a lone surrogate), which
            # strict UTF-8 refuses; such a token then matches only the same token on the other side
            found[token_id] = (token.replace("\u2581", " ") if kind == "Metaspace" else token).encode("utf-8", "surrogatepass")
    for token_id, role in special_roles.items():
        if token_id is not None:
            found[int(token_id)] = role
    return found


def token_byte_lengths(tokenizer: Any) -> Tensor:
    """``[V]`` LongTensor: UTF-8 bytes of text each id stands for; EOS counts 1 (the document
    separator), other special tokens 0.

    Used for held-out loss in nats per byte (token NLL summed / bytes covered), comparable across
    tokenizers; with the byte tokenizer every counted token is one byte, so nats/byte == nats/token.
    Byte-level BPE tokens that hold part of a character carry their own bytes, so the lengths of a
    text's tokens sum to its UTF-8 length.
    """
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token_id, value in token_bytes(tokenizer).items():
        if token_id < len(lengths):
            lengths[token_id] = len(value)
    for token_id, count in ((tokenizer.bos_token_id, 0), (tokenizer.eos_token_id, 1)):
        if token_id is not None:
            lengths[int(token_id)] = count
    return lengths


_VOCAB_MAPS: dict[tuple[str, str], VocabMap] = {}


def shared_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any, cache_dir: str | None = None) -> VocabMap:
    """Pairs of ids, one per side, whose byte strings (:func:`token_bytes`) are equal; sorted by student id.

    When one side spells the same bytes with several ids, the smallest id is kept. Built once per
    tokenizer pair: cached in memory by both tokenizers' identities
    (:func:`~kd_lightning.data.tokenizer.tokenizer_identity`) and, with ``cache_dir``, in a
    ``vocab-map-<key>.pt`` file there (written to a temporary name, then ``os.replace``).
    """
    from kd_lightning.data.tokenizer import tokenizer_identity

    key = (tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer))
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256("|".join(key).encode("utf-8")).hexdigest()[:16]
        path = os.path.join(cache_dir, f"vocab-map-{digest}.pt")
    if key not in _VOCAB_MAPS and path is not None and os.path.isfile(path):
        _VOCAB_MAPS[key] = VocabMap(*torch.load(path))
    if key not in _VOCAB_MAPS:
        _VOCAB_MAPS[key] = _build_vocab_map(student_tokenizer, teacher_tokenizer)
    result = _VOCAB_MAPS[key]
    if path is not None and not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        staging = f"{path}.{os.getpid()}.tmp"
        torch.save((result.student_ids, result.teacher_ids), staging)
        os.replace(staging, path)
    return result


def _build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    teacher_by_bytes: dict[bytes, int] = {}
    for token_id, value in sorted(token_bytes(teacher_tokenizer).items()):
        teacher_by_bytes.setdefault(value, token_id)
    pairs: dict[bytes, tuple[int, int]] = {}
    for token_id, value in sorted(token_bytes(student_tokenizer).items()):
        if value in teacher_by_bytes and value not in pairs:
            pairs[value] = (token_id, teacher_by_bytes[value])
    ordered = sorted(pairs.values())
    return VocabMap(torch.tensor([s for s, _ in ordered], dtype=torch.long).reshape(-1),
                    torch.tensor([t for _, t in ordered], dtype=torch.long).reshape(-1))

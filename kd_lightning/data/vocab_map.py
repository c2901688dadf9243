"""What each token id stands for in bytes, and the shared vocabulary of two tokenizers.

The data side of cross-tokenizer distillation: reads tokenizers, caches the shared-vocabulary map on
disk. The losses only receive the result, a :class:`~kd_lightning.losses.align.VocabMap` of tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kd_lightning.data.tokenizer import BYTE_OFFSET, is_byte_tokenizer, tokenizer_identity
from kd_lightning.infra.atomic import atomic_write_file
from kd_lightning.losses.align import NextByteMap, VocabMap

log = logging.getLogger("kd_lightning")


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
    """(``"ByteLevel"`` | ``"Metaspace"`` | None, the model type) of a fast tokenizer's spelling.

    ByteLevel: GPT-2's byte table in the decoder or the pre-tokenizer. Metaspace (SentencePiece
    spelling, ``▁`` = space, ``<0xNN>`` byte fallback): a Metaspace decoder or pre-tokenizer, or the
    Llama-style decoder ``Replace("▁", " ") + ByteFallback + Fuse + Strip``, or a model with
    ``byte_fallback``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None, None
    spec = json.loads(backend.to_str())
    kinds, replaces_metaspace = set(), False
    for part in (spec.get("decoder") or {}, spec.get("pre_tokenizer") or {}):
        for step in [part, *(part.get("decoders") or part.get("pretokenizers") or [])]:
            kinds.add(step.get("type"))
            replaces_metaspace |= step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == "\u2581"
    model = spec.get("model") or {}
    if "ByteLevel" in kinds:
        return "ByteLevel", model.get("type")
    if "Metaspace" in kinds or "ByteFallback" in kinds or replaces_metaspace or model.get("byte_fallback"):
        return "Metaspace", model.get("type")
    return None, model.get("type")


def token_bytes(tokenizer: Any, normalise: bool = True) -> dict[int, bytes]:
    """The UTF-8 byte string each ordinary token stands for, by id; special tokens are keyed by role.

    Normalisation, so that equal text gives equal keys whatever the tokenizer's spelling:
    byte-level BPE (GPT-2 style, ``Ġ`` = space) is mapped back through its byte table; SentencePiece
    style (``▁`` = space, ``<0xNN>`` byte fallback) is mapped to spaces and bytes; the byte tokenizer
    (ByT5) maps id ``b + 3`` to byte ``b``; anything else is its token string in UTF-8. EOS and BOS
    become the keys ``b"<eos>"`` / ``b"<bos>"`` on both sides (they match each other whatever they
    are called); other special tokens (pad, unk, added control tokens) are left out. A
    SentencePiece word-initial ``▁`` is a space even where the tokenizer invented it (prefix space at
    the start of a text): such a token then fails the exact-match check in ``span_kl`` and falls back
    to ULD, which is the safe side. ``normalise=False`` keeps every token's raw string (GOLD's
    raw-string matching, for comparison).
    """
    special_roles = {tokenizer.eos_token_id: b"<eos>", tokenizer.bos_token_id: b"<bos>"}
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    found: dict[int, bytes] = {}
    if is_byte_tokenizer(tokenizer):
        found = {byte + BYTE_OFFSET: bytes([byte]) for byte in range(256)}
    else:
        kind = _backend_kinds(tokenizer)[0] if normalise else None
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


def build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any, normalise: bool = True) -> VocabMap:
    """Pairs of ids, one per side, whose byte strings (:func:`token_bytes`) are equal; sorted by
    student id. When one side spells the same bytes with several ids, the smallest id is kept.
    ``normalise=False``: raw token strings instead (fewer matches across spellings)."""
    teacher_by_bytes: dict[bytes, int] = {}
    for token_id, value in sorted(token_bytes(teacher_tokenizer, normalise).items()):
        teacher_by_bytes.setdefault(value, token_id)
    pairs: dict[bytes, tuple[int, int]] = {}
    for token_id, value in sorted(token_bytes(student_tokenizer, normalise).items()):
        if value in teacher_by_bytes and value not in pairs:
            pairs[value] = (token_id, teacher_by_bytes[value])
    ordered = sorted(pairs.values())
    return VocabMap(torch.tensor([s for s, _ in ordered], dtype=torch.long).reshape(-1),
                    torch.tensor([t for _, t in ordered], dtype=torch.long).reshape(-1))


def _load_vocab_map(path: Path) -> VocabMap | None:
    """The map saved at `path` (a weights-only load: two int64 tensors), None when it is unreadable."""
    try:
        student_ids, teacher_ids = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged cache file: it is rebuilt and rewritten
        log.warning("%s: unreadable vocabulary map (%s: %s); rebuilding it", path, type(error).__name__, error)
        return None
    return VocabMap(student_ids, teacher_ids)


# Maps built in this process, by both tokenizers' identities: a sweep of runs builds each pair once.
_VOCAB_MAPS: dict[tuple[str, str], VocabMap] = {}


def shared_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any, cache_dir: str | None = None) -> VocabMap:
    """:func:`build_vocab_map` once per tokenizer pair: cached in memory by both tokenizers'
    identities (:func:`~kd_lightning.data.tokenizer.tokenizer_identity`) and, with ``cache_dir``, in
    a ``vocab-map-<key>.pt`` file there (written atomically, loaded weights-only)."""
    key = (tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer))
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256("|".join(key).encode("utf-8")).hexdigest()[:16]
        path = Path(cache_dir) / f"vocab-map-{digest}.pt"
    damaged = False
    if key not in _VOCAB_MAPS and path is not None and path.is_file():
        loaded = _load_vocab_map(path)
        damaged = loaded is None
        if loaded is not None:
            _VOCAB_MAPS[key] = loaded
    if key not in _VOCAB_MAPS:
        _VOCAB_MAPS[key] = build_vocab_map(student_tokenizer, teacher_tokenizer)
    result = _VOCAB_MAPS[key]
    if path is not None and (damaged or not path.is_file()):
        atomic_write_file(path, lambda temporary: torch.save((result.student_ids, result.teacher_ids), temporary))
    return result


def build_next_byte_map(student_tokenizer: Any, teacher_tokenizer: Any) -> NextByteMap | None:
    """The :class:`~kd_lightning.losses.align.NextByteMap` of a teacher's vocabulary for a byte-level
    student (``loss=byte_kl``); None when the student has no single-byte id for some byte or no EOS.
    Teacher tokens are read as bytes by :func:`token_bytes`; specials other than EOS are left out."""
    student_ids = {value[0]: token_id for token_id, value in sorted(token_bytes(student_tokenizer).items(), reverse=True)
                   if len(value) == 1 and token_id not in (student_tokenizer.eos_token_id, student_tokenizer.bos_token_id)}
    if len(student_ids) < 256 or student_tokenizer.eos_token_id is None:
        return None
    eos = teacher_tokenizer.eos_token_id
    strings = {token_id: value for token_id, value in token_bytes(teacher_tokenizer).items()
               if token_id not in (eos, teacher_tokenizer.bos_token_id) and value}
    vocab = max([len(teacher_tokenizer), *(token_id + 1 for token_id in strings)])
    width = max([1, *(len(value) for value in strings.values())])
    nodes: dict[bytes, int] = {b"": 0}
    entries: list[tuple[int, int, int]] = []  # (node, token, next byte)
    prefix_node = torch.full((vocab, width), -1, dtype=torch.long)
    token_length = torch.zeros(vocab, dtype=torch.long)
    for token_id, value in sorted(strings.items()):
        token_length[token_id] = len(value)
        for depth in range(len(value)):
            node = nodes.setdefault(value[:depth], len(nodes))
            prefix_node[token_id, depth] = node
            entries.append((node, token_id, value[depth]))
    if eos is not None:
        entries.append((0, int(eos), 256))
        prefix_node[int(eos), 0], token_length[int(eos)] = 0, 1
    entries.sort()
    table = torch.tensor(entries, dtype=torch.long).reshape(-1, 3)
    node_ptr = torch.zeros(len(nodes) + 1, dtype=torch.long)
    node_ptr[1:] = torch.bincount(table[:, 0], minlength=len(nodes)).cumsum(0)
    byte_ids = [student_ids[b] for b in range(256)] + [int(student_tokenizer.eos_token_id)]
    return NextByteMap(node_ptr, table[:, 1].contiguous(), table[:, 2].contiguous(), prefix_node, token_length,
                       torch.tensor(byte_ids, dtype=torch.long))

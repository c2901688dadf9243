"""Tokenizers for the language-modelling data modules.

The default is a byte-level tokenizer (ByT5's scheme: pad=0, eos=1, unk=2, byte ``b`` -> ``b + 3``)
because it needs no download, works offline on any text, and is a real Hugging Face tokenizer that
``save_pretrained`` writes next to the distilled student. Any other tokenizer is loaded with
``AutoTokenizer.from_pretrained`` from a local directory (or the hub cache).

transformers is imported inside the functions: importing it costs seconds, and ``encode_bytes``
(the fast path the embedded corpus uses) only needs numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BYTE_OFFSET = 3  # ids 0..2 are pad, eos, unk; byte b is id b + 3
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level ``ByT5Tokenizer`` without sentinel ids: vocabulary of 259 (pad=0, eos=1, unk=2).

    Scheme from "ByT5: Towards a token-free future with pre-trained byte-to-byte models"
    (Xue et al., 2022).
    """
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)


def load_tokenizer(name_or_path: str | None, key: str = "dataset.tokenizer") -> PreTrainedTokenizerBase:
    """The byte tokenizer for ``None``/``"byte"``, else ``AutoTokenizer.from_pretrained(name_or_path)``;
    errors name the config ``key``."""
    if name_or_path is None or name_or_path == "byte":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{key}={name_or_path!r}: directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{key}={name_or_path!r}: cannot load tokenizer ({first_line})") from error


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def teacher_side_tokenizer(spec: Any, student_tokenizer: Any) -> PreTrainedTokenizerBase | None:
    """The teacher's tokenizer when it tokenizes differently from the student's, else None.

    ``spec`` is ``dataset.teacher_tokenizer`` (by default ``teacher.tokenizer``, which for
    ``teacher=hf`` is the ``pretrained`` directory): None, a tokenizer, or a name/path. A model
    directory without tokenizer files means "not known" (None), as does a tokenizer equal to the
    student's (one tokenization serves both).
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        path = os.path.expanduser(spec)
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
            return None
        spec = load_tokenizer(spec, key="dataset.teacher_tokenizer")
    return None if same_tokenization(student_tokenizer, spec) else spec


def is_byte_tokenizer(tokenizer: Any) -> bool:
    """True when ``tokenizer`` maps byte ``b`` to ``b + 3`` with nothing else added (the fast path is exact)."""
    from transformers import ByT5Tokenizer

    return isinstance(tokenizer, ByT5Tokenizer) and len(tokenizer) == BYTE_VOCAB_SIZE


def encode_bytes(data: bytes) -> np.ndarray:
    """Byte ids of ``data`` without EOS: ``ids[i] = data[i] + 3`` (int32), identical to ``byte_tokenizer()``."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + BYTE_OFFSET


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token ids (int32, no special tokens) of each text; a numpy fast path for the byte tokenizer."""
    if not texts:
        return []
    if is_byte_tokenizer(tokenizer):
        return [encode_bytes(text.encode("utf-8")) for text in texts]
    # verbose=False: long documents are packed into windows later, so the "longer than the
    # model's maximum length" warning would be noise here.
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [np.asarray(ids, dtype=np.int32) for ids in encoded]


def eos_id(tokenizer: Any) -> int:
    """The id that separates documents and ends responses; a clear error when there is none."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"dataset.tokenizer={tokenizer.name_or_path!r}: tokenizer has no eos_token, "
            "which is needed to separate documents"
        )
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS (padded positions are masked anyway)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what decides the token ids: class, vocabulary/merges and special tokens (not the path)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # A fast tokenizer serialises its whole pipeline (merges, normalizer) to one string; a slow
    # one is identified by its vocabulary.
    rules = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "rules": hashlib.sha256(rules.encode("utf-8")).hexdigest(),
        "special": {key: str(value) for key, value in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def same_tokenization(first: Any, second: Any) -> bool:
    """True when both tokenizers map ordinary text to the same ids: the same base vocabulary, token
    for token. Added tokens (chat or tool markers that one release of a family adds) do not count,
    so e.g. two Qwen releases that split text identically share one tokenization; identical
    vocabularies with different merge rules do not occur in practice."""

    def base_vocabulary(tokenizer: Any) -> dict[str, int]:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return backend.get_vocab(with_added_tokens=False) if backend is not None else tokenizer.get_vocab()

    return first is second or base_vocabulary(first) == base_vocabulary(second)

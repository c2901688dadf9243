"""Offline byte-level BPE tokenizers, trained with the ``tokenizers`` library and cached on disk.

A second, real sub-word tokenizer is what a cross-tokenizer distillation demo needs (student on
bytes or a small BPE, teacher on another BPE) and what a larger student wants for the embedded
corpus. Byte-level (GPT-2's scheme, "Language Models are Unsupervised Multitask Learners",
Radford et al. 2019): every text encodes (no unknown character), ``decode(encode(text)) == text``,
and the fast tokenizer returns character offsets (``return_offsets_mapping=True``).

Special tokens: ``<pad>`` = 0, ``</s>`` (EOS) = 1, ``<unk>`` = 2, as in the byte tokenizer; the
unknown token is never produced by byte-level BPE but is declared so that tools expecting one work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kd_lightning.infra.atomic import plain_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, UNK]  # ids 0, 1, 2
BPE_FORMAT_VERSION = 1  # bump when the training recipe changes, so old caches are not reused


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, max_token_length: int | None = 24
) -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``vocab_size`` entries trained on ``texts``.

    The vocabulary holds the 3 special tokens, the 256 byte symbols and ``vocab_size - 259`` merges
    (fewer when the corpus has fewer pairs seen ``min_frequency`` times). ``max_token_length`` keeps
    long repeated runs (``####...``, indentation) from filling the vocabulary. No prefix space is
    added, so offsets and decoding are exact for any string, and offsets are not trimmed: a token's
    span includes its leading space, so the spans of a text's tokens tile it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        minimum = len(SPECIAL_TOKENS) + 256
        raise ValueError(f"vocab_size must be at least {minimum} (specials + bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def bpe_cache_key(corpus_fingerprint: str, vocab_size: int, **options: object) -> str:
    """A short hash of what decides the trained tokenizer: corpus identity, size, options, recipe version."""
    payload = {"corpus": corpus_fingerprint, "vocab_size": vocab_size, "options": options,
               "version": BPE_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def cached_bpe_tokenizer(
    cache_dir: str | os.PathLike[str],
    corpus_fingerprint: str,
    texts_fn: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """``train_bpe(texts_fn(), vocab_size)`` trained once per content key and loaded from disk afterwards.

    The directory is ``<cache_dir>/bpe-<vocab_size>-<key>``, where the key hashes
    ``corpus_fingerprint`` (the caller's identity of the training texts, e.g. a data module's
    ``fingerprint()``), the size and the options. ``texts_fn`` is only called on a miss. The
    tokenizer is saved with ``save_pretrained`` into a temporary sibling directory and renamed into
    place with ``os.replace``, so a crash or a concurrent trainer never leaves a half-written cache;
    the result loads with ``AutoTokenizer.from_pretrained(path)``.
    """
    from transformers import AutoTokenizer

    key = bpe_cache_key(corpus_fingerprint, vocab_size, min_frequency=min_frequency)
    target = os.path.join(os.fspath(cache_dir), f"bpe-{vocab_size}-{key}")
    if not os.path.isfile(os.path.join(target, "tokenizer.json")):
        os.makedirs(os.fspath(cache_dir), exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".bpe-{vocab_size}-", dir=os.fspath(cache_dir))
        try:
            plain_mode(staging, directory=True)  # mkdtemp's 0700 would make the cache private
            train_bpe(texts_fn(), vocab_size, min_frequency=min_frequency).save_pretrained(staging)
            try:
                os.replace(staging, target)
            except OSError:
                # Another process finished first (the target is a non-empty directory): keep theirs.
                if not os.path.isfile(os.path.join(target, "tokenizer.json")):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def read_texts(paths: Iterable[str]) -> Iterable[str]:
    """Each file as text (UTF-8; the rare undecodable byte becomes U+FFFD), read lazily."""
    for path in paths:
        with open(path, "rb") as handle:
            yield handle.read().decode("utf-8", errors="replace")


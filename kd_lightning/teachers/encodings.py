"""How a teacher's next-token distribution is written to the store, per position.

- ``full``: every log-probability, float32 (exact) or float16 (relative error ~1e-3): V·4 or V·2
  bytes per token (128 KB at V = 32k in float32).
- ``topk``: the k most likely ids (uint16 when V <= 65536, else int32), their log-probabilities
  (``uint8``: quantised as steps of 1/16 nat below the row's largest log-probability, stored once in
  float16, so the error is <= 1/32 nat; or float16/float32), and the tail's total mass (float16).
  Decoded, the k probabilities and the tail are renormalised together, so the distribution sums to 1.
  `sparse_kl` reads the tail as `teacher_cache.tail` says: spread uniformly over the V - k other
  ids (``uniform``, a run's default, as it measured best), as one extra bin (``bucket``: the KL
  between the distributions coarsened to the k ids + the tail) or not at all (``drop``); as dense
  log-probabilities (any other loss) the tail is spread uniformly. k = 32, uint8:
  32·(2 + 1) + 4 = 100 bytes per token at V = 32k.
- ``sample``: Random-Sampling KD (Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs"): ``num_draws`` i.i.d. draws from the teacher at ``temperature``,
  stored as the drawn ids and their counts (uint8), ``p̂_v = count_v / num_draws``, an unbiased
  estimate of p. Width k (>= num_draws never truncates; a smaller k keeps the k most drawn ids,
  renormalised, which is biased). k = 32: 96 bytes per token at V = 32k.

`full` and `topk` store log-probabilities at T = 1 (the loss applies its own temperature); `sample`
draws at ``temperature``, which is part of the stored targets and of the store's key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from kd_lightning.losses.sparse import SparseTargets, check_tail_mode

ENCODINGS = ("full", "topk", "sample")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
QUANT_STEPS_PER_NAT = 16.0  # uint8 log-probs: 1/16 nat steps, 255 steps = 15.9 nats below the row's max


@dataclass(frozen=True)
class Encoding:
    """An encoding and its parameters (all of them are part of the store's key).

    Args:
        encoding: ``full``, ``topk`` or ``sample`` (the config's ``teacher_cache.encoding`` /
            ``teacher_outputs.encoding``).
        dtype: stored values: ``full``: float32|float16; ``topk``: uint8|float16|float32; ``sample``:
            counts are always uint8 (the key is kept for a uniform config).
        k: ids per position (topk, sample).
        num_draws: draws per position (sample, <= 255).
        temperature: the teacher temperature the draws are made at (sample; 1.0 for the others).
    """

    encoding: str = "full"
    dtype: str = "float32"
    k: int = 32
    num_draws: int = 32
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"teacher store encoding={self.encoding!r}: must be one of {list(ENCODINGS)}")
        allowed = {"full": ("float32", "float16"), "topk": ("uint8", "float16", "float32"),
                   "sample": ("uint8", "float16", "float32")}[self.encoding]
        if self.dtype not in allowed:
            raise ValueError(f"teacher store dtype={self.dtype!r} for encoding={self.encoding}: must be one of {list(allowed)}")
        if self.encoding != "full" and int(self.k) < 1:
            raise ValueError(f"teacher store k={self.k!r}: must be >= 1")
        if self.encoding == "sample" and not 1 <= int(self.num_draws) <= 255:
            raise ValueError(f"teacher store num_draws={self.num_draws!r}: must lie in 1..255 (counts are uint8)")
        if float(self.temperature) <= 0:
            raise ValueError(f"teacher store temperature={self.temperature!r}: must be > 0")

    def params(self) -> dict[str, object]:
        """The parameters that change what is stored (unused ones normalised away), by field name."""
        params = asdict(self)
        if self.encoding == "full":
            params.update(k=None, num_draws=None, temperature=1.0)
        elif self.encoding == "topk":
            params.update(num_draws=None, temperature=1.0)
        else:
            params.update(dtype="uint8")
        return params

    def identity(self) -> dict[str, object]:
        """`params()` as a store's manifest and parts record them (format 2 calls the encoding
        `name`; kept, so stores written before stay valid and their hashed directories unchanged)."""
        params = self.params()
        return {("name" if key == "encoding" else key): value for key, value in params.items()}

    @classmethod
    def from_identity(cls, stored: dict[str, Any]) -> Encoding:
        """The `Encoding` a manifest records (`identity()`)."""
        fields = {("encoding" if key == "name" else key): value for key, value in stored.items()}
        return cls(**fields)

    def __str__(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.params().items() if value is not None)


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every id of the vocabulary."""
    return torch.uint16 if vocab_size <= 65536 else torch.int32


def encode(encoding: Encoding, logprobs: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Tensors [rows, L, ...] for teacher log-probabilities [rows, L, V] (float32, T = 1)."""
    vocab = logprobs.shape[-1]
    if encoding.encoding == "full":
        return {"values": logprobs.to(VALUE_DTYPES[encoding.dtype])}
    k = min(int(encoding.k), vocab)
    if encoding.encoding == "topk":
        values, ids = logprobs.topk(k, dim=-1)
        tail = (1.0 - values.exp().sum(-1)).clamp_min(0.0)
        out = {"ids": ids.to(id_dtype(vocab)), "tail": tail.to(torch.float16)}
        if encoding.dtype == "uint8":
            head = values[..., 0].to(torch.float16)  # stored first: the steps are measured from it
            steps = ((head.float().unsqueeze(-1) - values) * QUANT_STEPS_PER_NAT).round().clamp(0, 255)
            return {**out, "head": head, "steps": steps.to(torch.uint8)}
        return {**out, "values": values.to(VALUE_DTYPES[encoding.dtype])}
    probs = torch.softmax(logprobs / float(encoding.temperature), dim=-1).reshape(-1, vocab)
    draws = torch.multinomial(probs, int(encoding.num_draws), replacement=True, generator=generator)
    counts = torch.zeros_like(probs).scatter_add_(1, draws, torch.ones_like(draws, dtype=probs.dtype))
    top_counts, ids = counts.topk(k, dim=-1)  # drawn ids first, then count-0 padding
    lead = logprobs.shape[:-1]
    return {"ids": ids.reshape(*lead, k).to(id_dtype(vocab)), "counts": top_counts.reshape(*lead, k).to(torch.uint8)}


def truncated_rows(encoding: Encoding, tensors: dict[str, Tensor]) -> int:
    """Rows of a `sample` encoding whose draws did not all fit in k ids (their k most drawn kept)."""
    if encoding.encoding != "sample":
        return 0
    return int((tensors["counts"].sum(-1, dtype=torch.int32) < int(encoding.num_draws)).sum())


def decode_sparse(encoding: Encoding, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(ids long [..., k], probs float32 [..., k], tail float32 [...]) with Σ probs + tail = 1."""
    ids = tensors["ids"].long()
    if encoding.encoding == "sample":
        counts = tensors["counts"].float()
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        return ids, probs, torch.zeros(probs.shape[:-1])
    if "steps" in tensors:
        values = tensors["head"].float().unsqueeze(-1) - tensors["steps"].float() / QUANT_STEPS_PER_NAT
    else:
        values = tensors["values"].float()
    probs, tail = values.exp(), tensors["tail"].float()
    total = probs.sum(-1) + tail
    return ids, probs / total.unsqueeze(-1), tail / total


def decode_targets(encoding: Encoding, tensors: dict[str, Tensor], tail: str = "bucket") -> SparseTargets:
    """Sparse targets for `sparse_kl`; `full` keeps every id, `sample` is the drawn ids' frequencies.

    topk, by ``tail``: ``bucket`` (default) and ``uniform``: the k probabilities and the tail's mass
    (``SparseTargets.tail``, Σ probs + tail = 1), which `sparse_kl(tail=...)` turns into one extra
    bin or a uniform spread; ``drop``: the tail is dropped and the head renormalised (the common,
    biased Top-K variant; the behaviour before the bucket existed)."""
    check_tail_mode(tail)
    if encoding.encoding == "full":
        logprobs = tensors["values"].float()
        ids = torch.arange(logprobs.shape[-1]).expand_as(logprobs)
        return SparseTargets(ids, logprobs.exp())
    if encoding.encoding == "sample":  # count / (sum of counts): already sums to 1
        counts = tensors["counts"].float()
        return SparseTargets(tensors["ids"].long(), counts.div_(counts.sum(-1, keepdim=True).clamp_min_(1.0)))
    ids, probs, rest = decode_sparse(encoding, tensors)
    if tail != "drop":
        return SparseTargets(ids, probs, rest)
    return SparseTargets(ids, probs / probs.sum(-1, keepdim=True).clamp_min(1e-30))


def decode_dense(encoding: Encoding, tensors: dict[str, Tensor], vocab_size: int) -> Tensor:
    """Dense log-probabilities [..., V] (float32): any divergence can read them.

    topk: log p at the k ids and log(tail / (V - k)) elsewhere; sample: log p̂ at the drawn ids and
    -inf (probability 0) elsewhere, which every dense loss handles (a token the teacher rules out)."""
    if encoding.encoding == "full":
        return tensors["values"].float()
    ids, probs, tail = decode_sparse(encoding, tensors)
    if encoding.encoding == "sample":
        rest = torch.full((*ids.shape[:-1], 1), float("-inf"))
    else:
        others = max(vocab_size - ids.shape[-1], 1)
        rest = (tail.clamp_min(1e-12) / others).log().unsqueeze(-1)
    out = rest.expand(*ids.shape[:-1], vocab_size).clone()
    # count-0 padding ids are distinct from the drawn ids (topk of the counts): they stay -inf
    return out.scatter_(-1, ids, probs.log().masked_fill(probs == 0, float("-inf")))


__all__ = ["ENCODINGS", "Encoding", "decode_dense", "decode_sparse", "decode_targets", "encode", "id_dtype",
           "truncated_rows"]

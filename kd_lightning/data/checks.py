"""The data's own sanity checks, run once a split is read and before any training: empty records,
nothing to learn, one document dominating a split. Errors are `ConfigError`s naming the data key."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_warn

from kd_lightning.errors import ConfigError


def check_training_text(key: str, token_counts: Sequence[int], *, split: str = "train",
                        names: Sequence[str] | None = None, empty_warn_fraction: float = 0.1,
                        dominance: float = 0.5) -> None:
    """Sanity of a split's text: `token_counts[i]` is the number of tokens that record/document i
    contributes to the loss (its response tokens in prompt/response mode).

    - no token at all: `ConfigError` (nothing to learn), naming `key` (e.g. `dataset.paths=[...]`);
    - more than `empty_warn_fraction` of the records empty (or whitespace only): a warning with counts;
    - one document holding more than `dominance` of the split's tokens: a warning naming it."""
    total, count = sum(token_counts), len(token_counts)
    if total == 0:
        raise ConfigError(f"{key}: every one of the {count} {split} records is empty or whitespace only (0 tokens to "
                          "learn from); check the data and the text/response field")
    empty = sum(1 for n in token_counts if n == 0)
    if count and empty / count > empty_warn_fraction:
        rank_zero_warn(f"{key}: {empty} of {count} {split} records ({empty / count:.0%}) are empty or whitespace "
                       "only and contribute nothing")
    if count > 1:
        largest = max(range(count), key=lambda i: token_counts[i])
        share = token_counts[largest] / total
        if share > dominance:
            name = names[largest] if names is not None else f"record {largest}"
            rank_zero_warn(f"{key}: {name} holds {share:.0%} of the {split} split's {total} tokens; "
                           "the split is mostly one document")



def learnable_token_counts(texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> list[int]:
    """Per record, the tokens `check_training_text` counts: those of its text (the response in
    prompt/response mode), 0 when the text is empty or whitespace only (whose few tokens teach
    nothing but where the spaces go)."""
    return [0 if not text.strip() else len(ids) for text, ids in zip(texts, token_ids, strict=True)]

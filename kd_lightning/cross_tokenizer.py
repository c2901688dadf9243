"""Run-level wiring of cross-tokenizer distillation (issue #12): what the distill stage asks the
data module before building the LightningModule, and before evaluating.

The rule: a teacher only ever reads its own tokenizer's ids. A data module that knows the teacher's
tokenizer (`dataset.teacher_tokenizer`, by default `teacher.tokenizer`) and finds it different from
the student's carries both tokenizations (`LMDataModule.dual`); the module then runs the
`CrossTokenizerKD` path (`teacher_tokenization="own"`). A run whose teacher is known to tokenize
differently from what the data gives it is refused before any teacher is built or trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from kd_lightning.kd_paths import teacher_side


def refuse_foreign_tokens(teacher_tokenizers: Mapping[str, Any], datamodule: Any) -> None:
    """Raise when a teacher's configured tokenizer (`teacher.tokenizer`) is not the one whose ids the
    data gives that teacher (the teacher side of a dual module, else the student's)."""
    if getattr(datamodule, "task", None) != "causal_lm":
        return
    from kd_lightning.data.tokenizer import teacher_side_tokenizer

    dual = getattr(datamodule, "dual", False)
    data_spec = getattr(datamodule, "hparams", {}).get("teacher_tokenizer" if dual else "tokenizer")
    given = datamodule.teacher_tokenizer if dual else datamodule.tokenizer
    for name, spec in teacher_tokenizers.items():
        if spec is None or spec == data_spec:
            continue
        # bpe:<size> is trained on the embedded corpus (only its data module builds it): a different spec differs.
        if str(spec).startswith("bpe:") or teacher_side_tokenizer(spec, given) is not None:
            raise ValueError(
                f"teacher '{name}' uses tokenizer {spec!r} but the data would give it the ids of "
                f"{getattr(given, 'name_or_path', None) or type(given).__name__} ({len(given)} tokens): a teacher must "
                f"read its own tokens. Let the data carry both tokenizations (dataset.teacher_tokenizer={spec}, the "
                "default interpolates teacher.tokenizer; dataset=stdlib|text_files|hf) with loss=uld or loss=span_kl")


def teacher_tokenization_args(datamodule: Any, cache_dir: str, reuse_teacher_outputs: bool = False) -> dict[str, Any]:
    """The `DistillationModule` arguments a dual data module decides: the teacher reads its own
    tokens, and the pair's shared vocabulary (cached on disk under `<cache_dir>/vocab_maps`)."""
    if not getattr(datamodule, "dual", False):
        return {}
    if reuse_teacher_outputs:
        raise ValueError("teacher_outputs.reuse=true is not supported across tokenizers (the store is keyed by one "
                         "tokenization); set teacher_outputs.reuse=false")
    from kd_lightning.data.vocab_map import build_next_byte_map, shared_vocab_map
    from kd_lightning.infra.model_cache import cache_root

    vocab_map = shared_vocab_map(datamodule.tokenizer, datamodule.teacher_tokenizer,
                                 cache_dir=str(cache_root(cache_dir) / "vocab_maps"))
    # byte_kl's view of the teacher's tokens: only for a byte-level student (None otherwise), a
    # one-pass build over the teacher's vocabulary.
    next_byte_map = build_next_byte_map(datamodule.tokenizer, datamodule.teacher_tokenizer)
    # xtoken_kl's student -> teacher projection (re-tokenises every student token; about a second at 8k).
    from kd_lightning.data.vocab_projection import shared_vocab_projection

    projection = shared_vocab_projection(datamodule.tokenizer, datamodule.teacher_tokenizer)
    return {"teacher_tokenization": "own", "vocab_map": vocab_map, "next_byte_map": next_byte_map,
            "vocab_projection": projection}


class TeacherSide:
    """The teacher's side of each dual batch, streamed (re-iterable like the loader it wraps)."""

    def __init__(self, batches: Iterable[dict[str, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return (teacher_side(batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def teacher_batches(datamodule: Any, batches: Iterable[dict[str, Tensor]]) -> TeacherSide | None:
    """The teacher's side of each dual batch (for evaluating the teacher), None for single data."""
    return TeacherSide(batches) if getattr(datamodule, "dual", False) else None


def byte_lengths_of(datamodule: Any) -> tuple[Tensor | None, Tensor | None]:
    """UTF-8 bytes per token id of the student's and of the teacher's tokenizer (None for
    classification), for held-out loss in nats per byte."""
    if getattr(datamodule, "task", None) != "causal_lm":
        return None, None
    from kd_lightning.data.vocab_map import token_byte_lengths

    student = token_byte_lengths(datamodule.tokenizer)
    return student, token_byte_lengths(datamodule.teacher_tokenizer) if datamodule.dual else student

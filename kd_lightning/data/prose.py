"""English prose that exists offline wherever Python does: for real, pretrained teachers.

Three sources, each a list of documents:
- the docstrings of the standard library's modules (module, class and function docstrings of each
  ``.py`` file outside the test suites, read with ``ast.get_docstring``): one document per file,
  about 1.8 MB;
- ``pydoc_data.topics`` (the language reference behind ``help()``): one document per topic,
  about 0.47 MB;
- the licence texts under ``/usr/share/common-licenses`` where present (Debian): one per file,
  about 0.26 MB.

Documents are split randomly (seeded) into train/validation/test, as ``dataset=stdlib`` splits its
files, and tokenised with the teacher's tokenizer (``conf/dataset/prose.yaml`` interpolates
``teacher.tokenizer``; bytes when the teacher has none). With SmolLM2's 49k BPE the corpus is about
4.6 bytes per token. ``tokenizer: bpe:<size>`` (either side) is a byte-level BPE trained once on the
training documents only and cached under ``<cache_dir>/tokenizers`` (the student of
``experiment=smollm2_cross``).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from typing import Any

from typing_extensions import override

from kd_lightning.data.base import LMDataModule, check_fractions, check_positive, fingerprint_of, split_indices
from kd_lightning.data.bpe import cached_bpe_tokenizer
from kd_lightning.data.checks import check_training_text, learnable_token_counts
from kd_lightning.data.packing import pack_documents
from kd_lightning.data.stdlib import corpus_files
from kd_lightning.data.tokenizer import encode_texts

SOURCES = ("docstrings", "topics", "licenses")
LICENSES_DIR = "/usr/share/common-licenses"


def file_docstrings(path: str) -> str:
    """The module, class and function docstrings of one Python file, in source order, joined by
    blank lines ("" for a file that does not parse or has none)."""
    try:
        with open(path, "rb") as handle:
            tree = ast.parse(handle.read(), filename=path)
    except (SyntaxError, ValueError, OSError):
        return ""
    nodes = [tree] + sorted((n for n in ast.walk(tree)
                             if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))),
                            key=lambda n: n.lineno)
    docstrings = (ast.get_docstring(node, clean=True) for node in nodes)
    return "\n\n".join(text for text in docstrings if text and text.strip())


def prose_documents(sources: tuple[str, ...] | list[str] = SOURCES, stdlib_root: str | None = None,
                    licenses_dir: str = LICENSES_DIR) -> list[tuple[str, str]]:
    """``(name, text)`` of every non-empty document of the chosen sources, in a fixed order."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"dataset.sources: unknown {unknown}; choose from {list(SOURCES)}")
    documents: list[tuple[str, str]] = []
    root = stdlib_root or sysconfig.get_paths()["stdlib"]
    if "docstrings" in sources:
        documents += [(os.path.relpath(path, root), file_docstrings(path)) for path in corpus_files(root, (".py",))]
    if "topics" in sources:
        from pydoc_data.topics import topics

        documents += [(f"pydoc_data.topics:{name}", topics[name]) for name in sorted(topics)]
    if "licenses" in sources and os.path.isdir(licenses_dir):
        for name in sorted(os.listdir(licenses_dir)):
            path = os.path.join(licenses_dir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    documents.append((f"licenses:{name}", handle.read()))
    return [(name, text) for name, text in documents if text.strip()]


def split_prose(documents: list[tuple[str, str]], val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list[tuple[str, str]]]:
    """The documents of each split (seeded, by document), each split in its random order."""
    fractions = {"val": val_fraction, "test": test_fraction}
    indices = split_indices(len(documents), fractions, seed, what="prose documents")
    return {split: [documents[i] for i in order] for split, order in indices.items()}


def prose_tokenizer(spec: Any, key: str, cache_dir: str, documents: list[tuple[str, str]], seed: int,
                    val_fraction: float, test_fraction: float) -> Any:
    """``"bpe:<size>"``: a byte-level BPE trained once on the **training** documents (the split of
    the same seed and fractions) and cached under ``<cache_dir>/tokenizers``; any other spec as is."""
    if not (isinstance(spec, str) and spec.startswith("bpe:")):
        return spec
    from kd_lightning.infra.model_cache import cache_root

    size = spec.removeprefix("bpe:")
    if not size.isdigit():
        raise ValueError(f"{key}={spec!r}: expected bpe:<vocabulary size>, e.g. bpe:8192")
    train = split_prose(documents, val_fraction, test_fraction, seed)["train"]
    fingerprint = fingerprint_of({"prose-train": train})
    return cached_bpe_tokenizer(cache_root(cache_dir) / "tokenizers", fingerprint, lambda: [t for _, t in train],
                                int(size))


class ProseDataModule(LMDataModule):
    """Causal-LM windows over offline English prose (:func:`prose_documents`), split by document.

    Args:
        tokenizer: the teacher's tokenizer (a model directory or name; ``None``/``"byte"``: bytes;
            ``"bpe:<size>"``: a BPE of the training documents, see :func:`prose_tokenizer`).
        teacher_tokenizer: a different tokenizer for the teacher (dual data), as in ``dataset=stdlib``.
        cache_dir: where ``bpe:<size>`` tokenizers are cached (``paths.cache_dir``).
        sources: any of ``docstrings``, ``topics``, ``licenses``.
        stdlib_root: another directory to read docstrings from (default: the standard library).
        licenses_dir: where licence texts are read from when present.
        seq_len: tokens per window (a real model needs context: >= 256).
        val_fraction, test_fraction: share of documents held out for validation / test.
        max_train_tokens, max_eval_tokens: caps on the training and on each held-out stream.
        batch_size, eval_batch_size, num_workers, seed: see ``BaseDataModule``.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        teacher_tokenizer: Any = None,
        cache_dir: str = "~/.cache/kd_lightning",
        sources: list[str] | tuple[str, ...] = SOURCES,
        stdlib_root: str | None = None,
        licenses_dir: str = LICENSES_DIR,
        seq_len: int = 256,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_train_tokens: int = 2_000_000,
        max_eval_tokens: int = 32_768,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        check_fractions(val_fraction, test_fraction)
        documents = prose_documents(tuple(sources), stdlib_root, licenses_dir)
        if not documents:
            raise ValueError(f"dataset.sources={list(sources)}: no prose found")
        specs = ((tokenizer, "dataset.tokenizer"), (teacher_tokenizer, "dataset.teacher_tokenizer"))
        tokenizers = [prose_tokenizer(spec, key, cache_dir, documents, seed, val_fraction, test_fraction)
                      for spec, key in specs]
        super().__init__(tokenizers[0], seq_len, batch_size, eval_batch_size, num_workers, seed,
                         teacher_tokenizer=tokenizers[1])
        self.save_hyperparameters()
        check_positive("max_train_tokens", max_train_tokens)
        check_positive("max_eval_tokens", max_eval_tokens)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_train_tokens, self.max_eval_tokens = max_train_tokens, max_eval_tokens
        self.documents = documents

    def split_documents(self) -> dict[str, list[tuple[str, str]]]:
        """The documents of each split (seeded, by document), each split in its random order."""
        return split_prose(self.documents, self.val_fraction, self.test_fraction, self.seed)

    @override
    def _load(self) -> dict[str, Any]:
        caps = {"train": self.max_train_tokens, "val": self.max_eval_tokens, "test": self.max_eval_tokens}
        splits = self.split_documents()
        if self.teacher_tokenizer is not None:
            from kd_lightning.data.dual import DualTextDataset

            return {split: DualTextDataset([text for _, text in documents], self.tokenizer, self.teacher_tokenizer,
                                           self.seq_len, caps[split])
                    for split, documents in splits.items()}
        datasets = {}
        for split, documents in splits.items():
            texts = [text for _, text in documents]
            ids = encode_texts(self.tokenizer, texts)
            datasets[split] = pack_documents(iter(ids), self.eos_token_id, self.pad_token_id, self.seq_len, caps[split])
            if split == "train":
                check_training_text("dataset.sources", learnable_token_counts(texts, ids), split=split,
                                    names=[name for name, _ in documents])
        return datasets

    @override
    def _identity(self) -> dict[str, Any]:
        return {
            "documents": fingerprint_of({"documents": self.documents}),
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "max_train_tokens": self.max_train_tokens,
            "max_eval_tokens": self.max_eval_tokens,
            **self._token_identity(),
        }


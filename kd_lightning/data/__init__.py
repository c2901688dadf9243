"""LightningDataModules for the ``dataset`` config group (``conf/dataset/*.yaml``).

- ``StdlibDataModule``     ``dataset=stdlib``      the Python standard library source, bytes (default)
- ``ProseDataModule``     ``dataset=prose``       offline English prose (stdlib docstrings, pydoc topics, licences)
- ``TextFilesDataModule``  ``dataset=text_files``  local .txt / .jsonl files
- ``HFDataModule``         ``dataset=hf``          Hugging Face datasets (hub name, local files, save_to_disk)
- ``DigitsDataModule``     ``dataset=digits``      scikit-learn digits, classification

Classes are imported on first access: the modules import lightning, which takes seconds, and
code that only needs the tokenizer helpers should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kd_lightning.data.base import BaseDataModule, LMDataModule
    from kd_lightning.data.digits import DigitsDataModule
    from kd_lightning.data.prose import ProseDataModule
    from kd_lightning.data.stdlib import StdlibDataModule
    from kd_lightning.data.text import HFDataModule, TextFilesDataModule
    from kd_lightning.data.tokenizer import byte_tokenizer, encode_bytes, load_tokenizer

_EXPORTS = {
    "BaseDataModule": "base",
    "LMDataModule": "base",
    "DigitsDataModule": "digits",
    "StdlibDataModule": "stdlib",
    "ProseDataModule": "prose",
    "HFDataModule": "text",
    "TextFilesDataModule": "text",
    "byte_tokenizer": "tokenizer",
    "encode_bytes": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

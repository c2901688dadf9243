"""Reading text records from files: path resolution, ``.txt`` documents, ``.jsonl`` rows, fields.

A record is a tuple of strings, one per configured field: ``(text,)`` for plain text, or
``(prompt, response)`` when ``prompt_field`` is set. Every problem becomes a one-line error that
names the config key, the file (and line) and, for a missing field, the keys that are there.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

DATA_SUFFIXES = (".txt", ".jsonl")
Record = tuple[str, ...]
Fields = list[tuple[str, str]]  # (config key, field name), e.g. [("text_field", "text")]


def plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) -> plain dicts/lists, recursively; others unchanged."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(item) for item in value]
    return value


def _files_under(directory: str) -> list[str]:
    found = []
    for parent, subdirs, names in os.walk(directory):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        found += [os.path.join(parent, name) for name in names if name.endswith(DATA_SUFFIXES)]
    return sorted(found)


def resolve_paths(key: str, paths: str | Sequence[str]) -> list[str]:
    """Files, directories (recursive ``.txt``/``.jsonl``) or globs -> an ordered list of non-empty files."""
    entries = [paths] if isinstance(paths, str) else list(plain(paths))
    if not entries:
        raise ValueError(f"dataset.{key}=[]: give at least one file, directory or glob")
    files: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        if any(char in entry for char in "*?["):
            matches = sorted(path for path in glob.glob(entry, recursive=True) if os.path.isfile(path))
            if not matches:
                raise FileNotFoundError(f"dataset.{key}: glob {entry!r} matches no file")
        elif os.path.isdir(entry):
            matches = _files_under(entry)
            if not matches:
                raise ValueError(f"dataset.{key}: directory {entry!r} has no {'/'.join(DATA_SUFFIXES)} files")
        elif os.path.isfile(entry):
            matches = [entry]
        else:
            raise FileNotFoundError(f"dataset.{key}: {entry!r} does not exist")
        files += [path for path in matches if path not in files]
    for path in files:
        if os.path.getsize(path) == 0:
            raise ValueError(f"dataset.{key}: file {path!r} is empty")
    return files


def field_error(fields: Fields, field: str, where: str, available: Sequence[str]) -> ValueError:
    """The error for a field that a row or table lacks, listing what it has."""
    key = next(key for key, name in fields if name == field)
    return ValueError(f"dataset.{key}={field!r}: no such field in {where}; available keys: {sorted(available)}")


def check_text(fields: Fields, field: str, value: Any, where: str) -> str:
    """``value`` if it is a string, else a clear error naming the field."""
    if not isinstance(value, str):
        key = next(key for key, name in fields if name == field)
        raise ValueError(f"dataset.{key}={field!r}: in {where} the value is {type(value).__name__}, expected a string")
    return value


def record_from_row(row: Mapping[str, Any], fields: Fields, where: str) -> Record:
    """The configured fields of one JSON object, checked."""
    for _, field in fields:
        if field not in row:
            raise field_error(fields, field, where, list(row))
    return tuple(check_text(fields, field, row[field], where) for _, field in fields)


def read_records(key: str, path: str, fields: Fields) -> list[Record]:
    """Records of one file: a ``.txt`` file is one document, a ``.jsonl`` file one record per line."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"dataset.{key}: cannot read {path!r} ({reason})") from error
    if not path.endswith(".jsonl"):
        if fields[0][0] != "text_field":
            raise ValueError(
                f"dataset.{fields[0][0]}={fields[0][1]!r}: {path!r} is a plain-text file; "
                "prompt/response pairs need .jsonl"
            )
        if not text.strip():
            raise ValueError(f"dataset.{key}: file {path!r} has only whitespace")
        return [(text,)]
    records = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028, which splitlines() cuts at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset.{key}: {where} is not valid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise ValueError(f"dataset.{key}: {where} is a JSON {type(row).__name__}, expected an object")
        records.append(record_from_row(row, fields, where))
    if not records:
        raise ValueError(f"dataset.{key}: file {path!r} has no JSON lines")
    return records

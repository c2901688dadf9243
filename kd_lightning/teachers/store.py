"""One content-addressed store of a frozen teacher's next-token distributions.

Filled two ways, read one way:
- online (`teacher_outputs.reuse`, `kd_lightning.teachers.teacher_outputs`): the first run of a
  sweep stores the outputs it computes, later runs read them instead of running the teacher;
- offline (`stage=cache_teacher`, `kd_lightning.teachers.teacher_cache`): the whole training split is
  precomputed (several processes or DDP ranks share the work), and `teacher=cached` trains from it
  without a teacher model.

Layout of a store directory ``<root>/<teacher>-<key>``::

    manifest.json                 the identity: format, teacher (weights hash, config), precision,
                                  accelerator, encoding and its parameters; checked on every open
    part-<uuid>.safetensors       `keys` uint8 [n, 16] and the encoding's tensors [n, L, ...]; its
                                  metadata holds a checksum per tensor, verified when the part is
                                  opened (`kd_lightning.teachers.part_check`)
    covers-<data>.json            offline only: this training split is complete (data fingerprint,
                                  tokenizer, seq_len, number of samples)

A row is keyed by `row_keys` (blake2b of its length, token ids and attention mask), so any run that
feeds the teacher the same tokens finds it, whatever the batch or the order. A part is written to a
hidden temporary name and renamed, so an interrupted writer leaves only whole parts, and writers in
other processes write other parts (uuid names); rows another writer stored first are skipped.
The reader indexes the parts' keys (16 bytes a row) and memory-maps at most `max_open_parts` parts at
a time (`safetensors.safe_open`): resident memory does not grow with the number of parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from kd_lightning.infra.atomic import atomic_write_file, atomic_write_json, clean_stale_temporaries
from kd_lightning.losses.sparse import SparseTargets
from kd_lightning.infra.safeload import DamagedFileError, safe_open_checked
from kd_lightning.teachers.encodings import Encoding, decode_dense, decode_targets, encode, truncated_rows
from kd_lightning.teachers.identity import FORMAT_VERSION, store_directory, store_identity, weights_hash
from kd_lightning.teachers.part_check import CHECKSUM_KEY, part_checksum, part_problem

log = logging.getLogger("kd_lightning")

MANIFEST = "manifest.json"


def row_keys(input_ids: Tensor, attention_mask: Tensor | None) -> list[bytes]:
    """A 16-byte content key per row: its length, token ids and attention mask."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous().numpy()
    mask = None if attention_mask is None else attention_mask.detach().to("cpu", torch.int8).contiguous().numpy()
    keys = []
    for i in range(ids.shape[0]):
        h = hashlib.blake2b(digest_size=16)
        h.update(ids.shape[1].to_bytes(8, "little"))
        h.update(ids[i].tobytes())
        h.update(b"\0" if mask is None else mask[i].tobytes())
        keys.append(h.digest())
    return keys


def check_manifest(directory: Path, identity: dict[str, Any], *, what: str) -> None:
    """Write the manifest of a new store, or refuse a store built with other settings (a directory
    given by the user; hashed directories cannot differ)."""
    path = directory / MANIFEST
    wanted = json.loads(json.dumps(identity, default=str))
    if not path.is_file():
        atomic_write_json(path, wanted)
        return
    found = json.loads(path.read_text())
    differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if differ:
        detail = "; ".join(f"{k}: stored {found.get(k)!r}, this run {wanted.get(k)!r}" for k in differ)
        raise ValueError(f"{what}: {directory} holds teacher outputs built with other settings ({detail}); "
                         "choose another directory or delete this one")


class TeacherOutputStore:
    """Stored teacher distributions keyed by `row_keys`, in one `Encoding`.

    Args:
        directory: the store's directory (created if missing; its manifest must match `identity`).
        identity: `store_identity(...)`, or None to open an existing store as it is (`teacher=cached`).
        flush_rows: rows buffered in memory before they are written as a new part.
        max_gb: stop storing new rows (reading goes on) once the directory holds this much.
        max_open_parts: parts memory-mapped at once (least recently used are closed).
        damaged: a damaged part is `"recompute"`d (removed with a warning: the store is a cache) or an
            `"error"` naming the file and `damaged_fix` (offline targets).
        seed: seeds the `sample` encoding's draws.
    """

    def __init__(self, directory: str | os.PathLike[str], identity: dict[str, Any] | None, *, flush_rows: int = 1024,
                 max_gb: float = 20.0, max_open_parts: int = 2, damaged: str = "recompute", seed: int = 0,
                 what: str = "teacher store", damaged_fix: str = "delete it; it is recomputed on the next run") -> None:
        if int(flush_rows) < 1:
            raise ValueError(f"teacher_outputs.flush_rows={flush_rows!r}: must be >= 1")
        self.directory, self.what = Path(directory).expanduser(), what
        if identity is None:
            path = self.directory / MANIFEST
            if not path.is_file():
                raise FileNotFoundError(f"{what}: no teacher-output store at {self.directory} (no {MANIFEST})")
            identity = json.loads(path.read_text())
            if identity.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{what}: {path} has format version {identity.get('format_version')}, this "
                                 f"kd-lightning reads {FORMAT_VERSION}; rebuild it with stage=cache_teacher")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            check_manifest(self.directory, identity, what=what)
        self.identity = identity
        self.encoding = Encoding.from_identity(identity["encoding"])
        self.vocab_size = int(identity["vocab_size"])
        self.flush_rows, self.max_bytes, self.max_open = int(flush_rows), float(max_gb) * 2**30, max(int(max_open_parts), 1)
        self.damaged, self.damaged_fix = damaged, damaged_fix
        self.generator = torch.Generator().manual_seed(int(seed))
        self._parts: list[tuple[Path, float]] = []  # (file, teacher seconds per row)
        self._open: OrderedDict[int, Any] = OrderedDict()  # part -> safe_open handle (LRU)
        self._index: dict[bytes, tuple[int, int]] = {}  # key -> (part, row)
        self._seen: set[str] = set()
        self._buffer: dict[bytes, tuple[dict[str, Tensor], float]] = {}  # key -> (encoded row, seconds)
        self._bytes, self._full, self._last_scan = 0, False, 0.0
        self.stats = {"hit_rows": 0, "computed_rows": 0, "stored_rows": 0, "computed_seconds": 0.0,
                      "saved_seconds": 0.0, "lookup_seconds": 0.0, "truncated_rows": 0, "damaged_parts": 0}
        clean_stale_temporaries(self.directory, prefix="part-")
        self.scan()

    # ------------------------------------------------------------------ reading
    def scan(self) -> None:
        """Index the parts on disk not seen yet (written by other processes since the last scan)."""
        self._last_scan = time.monotonic()
        for path in sorted(self.directory.glob("part-*.safetensors")):
            if path.name in self._seen:
                continue
            fix = (self.damaged_fix if self.damaged == "error" else "it is removed and its rows are recomputed")
            try:
                with safe_open_checked(path, fix=fix) as handle:
                    meta, keys = handle.metadata() or {}, handle.get_tensor("keys").numpy()
                    problem = part_problem(handle, meta, self.vocab_size)  # checksum, ids in range
                if problem is not None:
                    raise DamagedFileError(f"{path} is damaged: {problem}; {fix}")
            except DamagedFileError as error:
                if self.damaged == "error":
                    raise DamagedFileError(f"{self.what}: {error}") from error
                log.warning("%s: %s", self.what, error)
                path.unlink(missing_ok=True)
                self.stats["damaged_parts"] += 1
                continue
            if meta.get("encoding") != json.dumps(self.encoding.identity(), sort_keys=True):
                raise ValueError(f"{self.what}: {path} was written with encoding {meta.get('encoding')}, the store's "
                                 f"manifest says {self.encoding.identity()}; delete the part")
            self._seen.add(path.name)
            self._bytes += path.stat().st_size
            part = len(self._parts)
            self._parts.append((path, float(meta.get("seconds_per_row", "nan"))))
            for row, key in enumerate(keys):
                self._index.setdefault(key.tobytes(), (part, row))

    def __len__(self) -> int:
        return len(self._index) + sum(k not in self._index for k in self._buffer)

    def written(self, keys: list[bytes]) -> bool:
        """True when every key's row is in a part on disk (as of the last `scan`; buffered rows do not count)."""
        return all(key in self._index for key in keys)

    def open_parts(self) -> int:
        """Parts memory-mapped right now (bounded by `max_open_parts`)."""
        return len(self._open)

    def _handle(self, part: int) -> Any:
        if part in self._open:
            self._open.move_to_end(part)
        else:
            self._open[part] = safe_open(str(self._parts[part][0]), framework="pt")
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return self._open[part]

    def missing(self, keys: list[bytes]) -> list[bytes]:
        """The keys not stored (rescanning first when parallel writers may have added them)."""
        absent = [k for k in keys if k not in self._index and k not in self._buffer]
        if absent and time.monotonic() - self._last_scan > 10.0:
            self.scan()
            absent = [k for k in absent if k not in self._index]
        return absent

    def rows(self, keys: list[bytes], seq_len: int) -> dict[str, Tensor] | None:
        """The encoded rows, stacked [B, L, ...], or None unless every row is stored at this length."""
        start = time.perf_counter()
        try:
            if self.missing(keys):
                return None
            blocks, saved = [], 0.0  # each: {name: [n, L, ...]}, n consecutive rows of one part read at once
            run: list[int] | None = None  # [part, first row, end row] of the rows being gathered
            for key in [*keys, None]:
                at = self._index.get(key) if key is not None and key not in self._buffer else None
                if run is not None and (at is None or at != (run[0], run[2])):
                    handle = self._handle(run[0])
                    blocks.append({name: handle.get_slice(name)[run[1]:run[2]] for name in handle.keys() if name != "keys"})
                    saved += (run[2] - run[1]) * self._parts[run[0]][1]
                    run = None
                if at is not None:
                    run = [at[0], at[1], at[1] + 1] if run is None else [run[0], run[1], run[2] + 1]
                elif key is not None:
                    row, seconds = self._buffer[key]
                    blocks.append({name: t.unsqueeze(0) for name, t in row.items()})
                    saved += seconds
            out = {name: torch.cat([b[name] for b in blocks]) for name in blocks[0]}
            if next(iter(out.values())).shape[1] != seq_len:
                return None
            self.stats["hit_rows"] += len(keys)
            self.stats["saved_seconds"] += 0.0 if saved != saved else saved  # NaN: not measured
            return out
        finally:
            self.stats["lookup_seconds"] += time.perf_counter() - start

    def get(self, keys: list[bytes], seq_len: int) -> Tensor | None:
        """Dense log-probabilities [B, L, V] (float32, CPU) of the rows, or None unless all are stored."""
        rows = self.rows(keys, seq_len)
        return None if rows is None else decode_dense(self.encoding, rows, self.vocab_size)

    def targets(self, keys: list[bytes], seq_len: int, tail: str = "bucket") -> SparseTargets | None:
        """Sparse targets [B, L, k] of the rows (for `sparse_kl`; topk: ``tail`` as in
        `decode_targets`), or None unless all are stored."""
        rows = self.rows(keys, seq_len)
        return None if rows is None else decode_targets(self.encoding, rows, tail)

    # ------------------------------------------------------------------ writing
    def put(self, keys: list[bytes], logits: Tensor, seconds: float) -> None:
        """Store the rows of teacher logits [B, L, V] not stored yet; `seconds` is the teacher time."""
        self.stats["computed_rows"] += len(keys)
        self.stats["computed_seconds"] += seconds
        if self._full:
            return
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"{self.what}: teacher logits have {logits.shape[-1]} entries, the store {self.vocab_size}")
        new = [i for i, key in enumerate(keys) if key not in self._index and key not in self._buffer]
        if not new:
            return
        logprobs = torch.log_softmax(logits.detach()[new].float(), dim=-1).cpu()
        encoded = encode(self.encoding, logprobs, self.generator)
        self.stats["truncated_rows"] += truncated_rows(self.encoding, encoded)
        per_row = seconds / max(len(keys), 1)
        for j, i in enumerate(new):
            self._buffer[keys[i]] = ({name: t[j].clone() for name, t in encoded.items()}, per_row)
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as new parts (one per sequence length), each atomically."""
        if not self._buffer:
            return
        by_len: dict[int, list[bytes]] = {}
        for key, (row, _) in self._buffer.items():
            by_len.setdefault(next(iter(row.values())).shape[0], []).append(key)
        for keys in by_len.values():
            rows = [self._buffer[k] for k in keys]
            tensors = {name: torch.stack([r[0][name] for r in rows]).contiguous() for name in rows[0][0]}
            tensors["keys"] = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 16)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if self._bytes + size > self.max_bytes:
                self._full = True
                log.warning("%s: %s holds %.1f GiB, max_gb=%.1f reached; new teacher outputs are no longer stored "
                            "(stored ones are still read)", self.what, self.directory, self._bytes / 2**30,
                            self.max_bytes / 2**30)
                break
            meta = {"format_version": str(FORMAT_VERSION), "encoding": json.dumps(self.encoding.identity(), sort_keys=True),
                    "seconds_per_row": repr(sum(r[1] for r in rows) / len(rows)),
                    CHECKSUM_KEY: part_checksum(tensors)}
            atomic_write_file(self.directory / f"part-{uuid.uuid4().hex}.safetensors",
                              lambda temporary: save_file(tensors, str(temporary), metadata=meta))
            self.stats["stored_rows"] += len(keys)
        self._buffer.clear()
        self.scan()


def bytes_per_token(directory: str | os.PathLike[str]) -> float:
    """Bytes of the parts' encoded tensors per stored position (row keys excluded), from the files."""
    total, positions = 0, 0
    for path in Path(directory).glob("part-*.safetensors"):
        with safe_open_checked(path) as handle:
            for name in handle.keys():
                if name != "keys":
                    shape = handle.get_slice(name).get_shape()  # [n, L, ...]
                    total += handle.get_tensor(name).element_size() * int(torch.Size(shape).numel())
            positions += int(shape[0]) * int(shape[1])
    return total / max(positions, 1)


__all__ = ["FORMAT_VERSION", "MANIFEST", "TeacherOutputStore", "bytes_per_token", "check_manifest", "row_keys",
           "store_directory", "store_identity", "weights_hash"]

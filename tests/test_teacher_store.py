"""The teacher store (kd_lightning/teachers/store.py) and its encodings (encodings.py): sizes at a
realistic vocabulary, exactness of what is decoded, streaming reads, several writers."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from kd_lightning.losses import adaptive_kl, forward_kl, generalized_jsd, jensen_shannon, reverse_kl, skew_kl
from kd_lightning.losses import skew_reverse_kl, total_variation
from kd_lightning.teachers.encodings import QUANT_STEPS_PER_NAT, Encoding, decode_dense, decode_sparse, encode
from kd_lightning.teachers.store import TeacherOutputStore, bytes_per_token, store_identity


def resident_bytes() -> int:
    """Current resident set size (Linux), not the peak."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_store(directory: Path, vocab: int, encoding: Encoding, **kwargs) -> TeacherOutputStore:
    identity = store_identity(weights="w", model_config=None, precision="32-true", accelerator="cpu",
                              vocab_size=vocab, encoding=encoding)
    return TeacherOutputStore(directory, identity, **kwargs)


def peaked_logits(rows: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """LM-like logits: a Zipf-shaped distribution over a shuffled vocabulary, plus noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    base = -1.1 * ranks.log()
    out = torch.stack([base[torch.randperm(vocab, generator=g)] for _ in range(rows * length)])
    return (out + 0.5 * torch.randn(out.shape, generator=g)).view(rows, length, vocab)


def keys(n: int, offset: int = 0) -> list[bytes]:
    return [(offset + i).to_bytes(16, "little") for i in range(n)]


@pytest.mark.parametrize("encoding, expected", [
    (Encoding("full", "float32"), 32000 * 4), (Encoding("full", "float16"), 32000 * 2),
    (Encoding("topk", "uint8", k=32), 32 * 3 + 4), (Encoding("topk", "float16", k=32), 32 * 4 + 2),
    (Encoding("sample", k=32, num_draws=32), 32 * 3)])
def test_bytes_per_token_at_32k_from_the_files(tmp_path: Path, encoding: Encoding, expected: int) -> None:
    store = make_store(tmp_path, 32000, encoding)
    store.put(keys(2), peaked_logits(2, 4, 32000), 0.0)
    store.flush()
    assert bytes_per_token(tmp_path) == expected
    if encoding.encoding != "full":
        assert expected <= 200


def test_written_counts_rows_on_disk_not_buffered_ones(tmp_path: Path) -> None:
    store = make_store(tmp_path, 64, Encoding("topk", k=4), flush_rows=100)
    store.put(keys(3), peaked_logits(3, 2, 64), 0.0)
    assert not store.written(keys(3)) and not store.missing(keys(3))  # buffered: stored, not yet written
    store.flush()
    assert store.written(keys(3)) and not store.written(keys(4))
    assert sorted(p.name.startswith("part-") for p in tmp_path.iterdir()) == [False, True]  # manifest, 1 part


def test_ids_use_int32_above_65536(tmp_path: Path) -> None:
    store = make_store(tmp_path, 70000, Encoding("topk", k=4))
    store.put(keys(1), peaked_logits(1, 2, 70000), 0.0)
    rows = store.rows(keys(1), 2)
    assert rows is not None and rows["ids"].dtype == torch.int32


def test_topk_distribution_sums_to_one_and_quantisation_is_bounded() -> None:
    logprobs = torch.log_softmax(peaked_logits(3, 5, 500), -1)
    for dtype in ("uint8", "float16"):
        tensors = encode(Encoding("topk", dtype, k=16), logprobs)
        ids, probs, tail = decode_sparse(Encoding("topk", dtype, k=16), tensors)
        assert torch.allclose(probs.sum(-1) + tail, torch.ones(3, 5), atol=1e-6)
        dense = decode_dense(Encoding("topk", dtype, k=16), tensors, 500)
        assert torch.allclose(dense.exp().sum(-1), torch.ones(3, 5), atol=1e-5)
    tensors = encode(Encoding("topk", "uint8", k=16), logprobs)
    top = logprobs.topk(16, dim=-1).values
    raw = tensors["head"].float().unsqueeze(-1) - tensors["steps"].float() / QUANT_STEPS_PER_NAT
    in_range = top > top[..., :1] - 255 / QUANT_STEPS_PER_NAT
    head_error = (tensors["head"].float() - top[..., 0]).abs().max()  # float16 of the row's max
    assert float(((raw - top).abs()[in_range]).max()) <= 0.5 / QUANT_STEPS_PER_NAT + head_error + 1e-6


def test_sample_encoding_is_unbiased() -> None:
    """Monte-Carlo mean of p̂ over many independent encodings approaches p within 4 sigma."""
    logprobs = torch.log_softmax(torch.randn(1, 1, 20) * 1.5, -1)
    p = logprobs.exp().view(-1)
    encoding, trials = Encoding("sample", k=8, num_draws=8), 4000
    g = torch.Generator().manual_seed(0)
    batch = logprobs.expand(trials, 1, 20).contiguous()
    ids, probs, _ = decode_sparse(encoding, encode(encoding, batch, g))
    mean = torch.zeros(trials, 20).scatter_add_(-1, ids.view(trials, -1), probs.view(trials, -1)).mean(0)
    sigma = (p * (1 - p) / (8 * trials)).sqrt()
    assert bool(((mean - p).abs() <= 4 * sigma + 1e-6).all()), (mean - p).abs().max()
    assert torch.allclose(probs.sum(-1), torch.ones(trials, 1))


@pytest.mark.parametrize("name", ["topk", "sample"])
def test_every_dense_loss_reads_a_sparse_encoding(name: str) -> None:
    """topk + tail and sample counts (-inf outside the drawn ids) decode to teacher log-probs that
    each same-vocabulary divergence turns into a finite loss with finite gradients."""
    vocab = 50
    logprobs = torch.log_softmax(peaked_logits(2, 6, vocab), -1)
    encoding = Encoding(name, k=8, num_draws=8)
    teacher = decode_dense(encoding, encode(encoding, logprobs, torch.Generator().manual_seed(0)), vocab)
    if name == "sample":
        assert bool(torch.isinf(teacher).any())
    mask = torch.ones(2, 6, dtype=torch.bool)
    for fn in (forward_kl, reverse_kl, skew_kl, skew_reverse_kl, jensen_shannon, generalized_jsd, total_variation,
               adaptive_kl):
        student = torch.randn(2, 6, vocab, requires_grad=True)
        loss = fn(student, teacher, mask, temperature=2.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all(), fn.__name__


def test_reader_streams_twenty_parts_with_bounded_memory(tmp_path: Path) -> None:
    """20 parts of ~3 MB: reading every row keeps at most 2 parts mapped and resident memory grows by
    less than 2 parts' size plus a constant."""
    vocab, length, per_part = 4000, 16, 12
    writer = make_store(tmp_path, vocab, Encoding("full", "float32"), flush_rows=per_part)
    for part in range(20):
        writer.put(keys(per_part, part * per_part), torch.randn(per_part, length, vocab), 0.0)
    writer.flush()
    files = sorted(tmp_path.glob("part-*.safetensors"))
    part_bytes = files[0].stat().st_size
    assert len(files) == 20
    reader = make_store(tmp_path, vocab, Encoding("full", "float32"), max_open_parts=2)
    before = resident_bytes()
    for part in range(20):
        for row in range(0, per_part, 4):
            out = reader.get(keys(4, part * per_part + row), length)
            assert out is not None and out.shape == (4, length, vocab)
            assert reader.open_parts() <= 2
    del out
    grown = resident_bytes() - before  # with all 20 parts mapped (max_open_parts=20) this is ~60 MB
    assert grown < 2 * part_bytes + 16 * 2**20, (grown, part_bytes)


def _writer(directory: str, start: int, queue) -> None:
    store = make_store(Path(directory), 64, Encoding("topk", k=4), flush_rows=5)
    g = torch.Generator().manual_seed(start)
    for batch in range(6):  # overlapping keys: 0..29 for both writers
        store.missing(keys(5, batch * 5))
        store.put(keys(5, batch * 5), torch.randn(5, 3, 64, generator=g), 0.0)
    store.flush()
    queue.put(store.stats["stored_rows"])


def test_two_processes_write_one_store_without_clashing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, queue)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    stored = [queue.get(timeout=5) for _ in procs]
    assert sum(stored) >= 30 and not list(tmp_path.glob(".*tmp*"))
    reader = make_store(tmp_path, 64, Encoding("topk", k=4))
    assert len(reader) == 30 and reader.get(keys(30), 3) is not None

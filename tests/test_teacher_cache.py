"""Offline teacher targets: `stage=cache_teacher` fills the teacher store, `teacher=cached` trains on it."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd_lightning.losses.sparse import SparseTargets
from kd_lightning.run.builders import obtain_teacher
from kd_lightning.teachers.store import bytes_per_token, row_keys
from kd_lightning.run.pipeline import run
from tests.conftest import column, compose_config, metrics_csv, tiny_overrides

# Smaller than the shared tiny data so that the teacher's pass over the training split takes ~1 s.
DATA = ("dataset.max_train_tokens=12000", "dataset.batch_size=8")
CACHE = ("teacher_cache.k=12", "teacher_cache.shard_size=64")
SAMPLE_DRAWS = "teacher_cache.num_draws=12"  # acts only with encoding=sample (the default); refused otherwise
SAMPLE_CACHE = (*CACHE, SAMPLE_DRAWS)


def cache_cfg(tmp: Path, cache_dir: Path, *overrides: str):
    sample = not any(o.startswith("teacher_cache.encoding=") and o != "teacher_cache.encoding=sample" for o in overrides)
    chosen = (*DATA, *CACHE, *((SAMPLE_DRAWS,) if sample else ()), *overrides)
    return compose_config([*tiny_overrides(chosen), *chosen], tmp / "run", cache_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One cache per encoding, built once for the module: {encoding: directory}."""
    out = {}
    for encoding in ("sample", "topk"):
        tmp = tmp_path_factory.mktemp(f"cache_{encoding}")
        cfg = cache_cfg(tmp, cache_dir, "stage=cache_teacher", f"teacher_cache.encoding={encoding}",
                        f"teacher_cache.dir={tmp / 'targets'}")
        out[encoding] = Path(run(cfg)["teacher_targets"])
    return out


def dense(targets: SparseTargets, vocab: int) -> torch.Tensor:
    return torch.zeros(*targets.indices.shape[:-1], vocab).scatter_add_(-1, targets.indices.long(), targets.probs.float())


def dense(targets: SparseTargets, vocab: int) -> torch.Tensor:
    return torch.zeros(*targets.indices.shape[:-1], vocab).scatter_add_(-1, targets.indices.long(), targets.probs.float())


def parts(directory: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(p)) for p in sorted(directory.glob("part-*.safetensors"))]


def test_store_covers_every_training_sample_then_train(built, make_cfg, tmp_path: Path) -> None:
    directory = built["sample"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["encoding"] == {"name": "sample", "dtype": "uint8", "k": 12, "num_draws": 12, "temperature": 1.0}
    assert manifest["format_version"] == 2 and len(manifest["weights"]) == 16 and manifest["precision"]
    covers = [json.loads(p.read_text()) for p in directory.glob("covers-*.json")]
    assert len(covers) == 1 and covers[0]["seq_len"] == 64
    stored = parts(directory)
    assert len(stored) > 1 and not list(directory.glob(".claim-*"))  # shard_size=64 samples a part
    assert sum(len(p["keys"]) for p in stored) == covers[0]["num_samples"]
    for p in stored:  # ids in the smallest type that holds V, counts in a byte
        assert p["ids"].dtype == torch.uint16 and p["counts"].dtype == torch.uint8 and p["ids"].shape[1:] == (64, 12)
    assert bytes_per_token(directory) == 12 * 3

    cfg = make_cfg(*DATA, *SAMPLE_CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={directory}", "baseline=false")
    summary = run(cfg)
    losses = column(metrics_csv(Path(cfg.paths.output_dir)), "train/kd_loss")
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert set(summary["models"]) == {"student (KD)"} and "teacher:cached" in summary["notes"][0]
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("tail", [None, "bucket", "drop"])
def test_sparse_kl_from_topk_targets_uses_the_configured_tail_mode(built, make_cfg, tmp_path: Path, monkeypatch, tail) -> None:
    """teacher=cached loss=sparse_kl with a topk store: the KD kernel gets the stored tail's mass and
    teacher_cache.tail (default `uniform`, which measured best; docs/benchmarks.md)."""
    import kd_lightning.kd_paths as kd_paths

    seen = []
    original = kd_paths.fast_sparse_kd_terms

    def spy(student_rows, targets, labels, **kwargs):
        seen.append((targets.tail, kwargs.get("tail")))
        return original(student_rows, targets, labels, **kwargs)

    monkeypatch.setattr(kd_paths, "fast_sparse_kd_terms", spy)
    chosen = () if tail is None else (f"teacher_cache.tail={tail}",)
    cfg = make_cfg(*DATA, *CACHE, "teacher_cache.encoding=topk", "teacher=cached", "loss=sparse_kl", *chosen,
                   f"teacher_cache.dir={built['topk']}", "baseline=false")
    run(cfg)
    losses = column(metrics_csv(Path(cfg.paths.output_dir)), "train/kd_loss")
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert seen and all(mode == (tail or "uniform") for _, mode in seen)
    if tail == "drop":
        assert all(t is None for t, _ in seen)
    else:  # the tail's mass of every counted position (a flat tiny teacher: well above 0)
        assert all(t is not None and t.dim() == 1 and float(t.min()) >= 0 and float(t.mean()) > 0.01 for t, _ in seen)


@pytest.mark.parametrize("loss", ["kl", "reverse_kl", "js"])
def test_any_dense_loss_trains_from_topk_targets(built, make_cfg, tmp_path: Path, loss: str) -> None:
    """A loss other than sparse_kl reads the store decoded to dense log-probabilities (top-k + tail)."""
    cfg = make_cfg(*DATA, *CACHE, "teacher_cache.encoding=topk", "teacher=cached", f"loss={loss}",
                   f"teacher_cache.dir={built['topk']}", "baseline=false")
    run(cfg)
    losses = column(metrics_csv(Path(cfg.paths.output_dir)), "train/kd_loss")
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))), losses


def test_cross_vocab_or_chunked_loss_refuses_cached_targets(built, make_cfg, tmp_path: Path) -> None:
    for override in ("loss=uld", "loss.chunk_size=16"):
        with pytest.raises(ValueError, match="offline or served targets.*cannot read"):
            run(make_cfg(*DATA, "teacher=cached", override, f"teacher_cache.dir={built['topk']}",
                         output_dir=tmp_path / override.replace("=", "_")))


@pytest.mark.parametrize("encoding", ["topk", "sample"])
def test_stored_targets_are_the_live_teachers(built, tmp_path: Path, cache_dir: Path, encoding: str) -> None:
    import hydra

    from kd_lightning.teachers.encodings import QUANT_STEPS_PER_NAT

    cfg = cache_cfg(tmp_path, cache_dir, f"teacher_cache.encoding={encoding}")
    datamodule = hydra.utils.instantiate(cfg.dataset)
    teacher = obtain_teacher(cfg, cfg.teacher, datamodule).eval()  # the session-cached tiny teacher
    datamodule.setup("fit")
    from kd_lightning.run.settings import teacher_cache_options
    from kd_lightning.teachers.teacher_cache import load_cached_teacher

    cfg.teacher_cache.dir = str(built[encoding])
    reader = load_cached_teacher(teacher_cache_options(cfg), datamodule, sparse=True)
    items = [datamodule.datasets["train"][i] for i in range(10)]
    batch = {k: torch.stack([x[k] for x in items]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        live = torch.softmax(teacher(**batch).logits[:, :-1].float(), -1)
    targets = reader.targets(batch)
    probs = dense(targets, datamodule.vocab_size)
    tail = 0.0 if targets.tail is None else targets.tail
    assert torch.allclose(probs.sum(-1) + tail, torch.ones(10, 63), atol=1e-5)
    if encoding == "topk":  # the k largest, within the quantisation step, and the tail's mass (the bucket)
        top, ids = live.topk(12, dim=-1)
        assert torch.equal(targets.indices.sort(-1).values, ids.sort(-1).values)
        ratio = targets.probs / top
        assert float((ratio.log().abs()).max()) <= 2 / QUANT_STEPS_PER_NAT
        assert torch.allclose(targets.tail, 1 - top.sum(-1), atol=0.05)
        reader.tail = "drop"  # teacher_cache.tail=drop: the head renormalised, no tail (the old Top-K targets)
        dropped = reader.targets(batch)
        assert dropped.tail is None and torch.allclose(dropped.probs.sum(-1), torch.ones(10, 63), atol=1e-5)
    else:  # drawn ids only where the teacher has mass, counts in units of 1/num_draws
        assert bool((live.gather(-1, targets.indices) > 0).all()) and torch.allclose(targets.probs * 12, (targets.probs * 12).round())
    assert row_keys(batch["input_ids"], batch["attention_mask"]) == row_keys(batch["input_ids"], batch["attention_mask"])


def test_mismatching_or_missing_cache_fails_before_training(built, make_cfg, tmp_path: Path) -> None:
    directory = built["sample"]
    base = ("teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={directory}", "baseline=false")
    with pytest.raises(ValueError, match=r"built for data fingerprint '[0-9a-f]{16}' but this run has '[0-9a-f]{16}'.*stage=cache_teacher"):
        run(make_cfg(*DATA, *SAMPLE_CACHE, *base, "dataset.max_train_tokens=10000"))
    with pytest.raises(ValueError, match=r"built with teacher_cache.k=12 but this run has 8"):
        run(make_cfg(*DATA, *SAMPLE_CACHE, *base, "teacher_cache.k=8", output_dir=tmp_path / "k"))
    with pytest.raises(ValueError, match=r"seq len 64 but this run has 32"):
        run(make_cfg(*DATA, *SAMPLE_CACHE, *base, "dataset.seq_len=32", output_dir=tmp_path / "len"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"no teacher-target cache at {missing}.*stage=cache_teacher"):
        run(make_cfg(*DATA, *SAMPLE_CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={missing}", output_dir=tmp_path / "m"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_targets_of_another_temperature_or_encoding_are_refused(built, make_cfg, tmp_path: Path) -> None:
    """#16: the store's manifest covers every setting that changes the targets."""
    base = (*DATA, *CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={built['sample']}", "baseline=false")
    with pytest.raises(ValueError, match=r"built with teacher_cache.temperature=1.0 but this run has 2.0"):
        run(make_cfg(*base, SAMPLE_DRAWS, "teacher_cache.temperature=2.0", output_dir=tmp_path / "t"))
    with pytest.raises(ValueError, match=r"teacher_cache.encoding='sample'.*but this run has 'topk'"):
        run(make_cfg(*base, "teacher_cache.encoding=topk", output_dir=tmp_path / "m"))
    with pytest.raises(ValueError, match=r"teacher_cache.num_draws=12.* but this run has 24"):
        run(make_cfg(*base, "teacher_cache.num_draws=24", output_dir=tmp_path / "n"))


def test_cache_into_an_existing_empty_directory_writes_its_targets(tmp_path: Path, cache_dir: Path) -> None:
    """#16: stage=cache_teacher into an existing (empty) directory used to report success and keep nothing."""
    target = tmp_path / "targets"
    target.mkdir()
    run(cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", f"teacher_cache.dir={target}"))
    assert list(target.glob("part-*.safetensors")) and list(target.glob("covers-*.json"))
    with pytest.raises(ValueError, match=r"holds teacher outputs built with other settings \(encoding"):
        run(cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", "teacher_cache.encoding=topk", f"teacher_cache.dir={target}"))


def test_damaged_part_is_named_then_recomputed(built, make_cfg, tmp_path: Path, cache_dir: Path) -> None:
    """#16: a truncated part: teacher=cached names the file and the fix; stage=cache_teacher recomputes it."""
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(built["topk"], directory)
    part = sorted(directory.glob("part-*.safetensors"))[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=rf"{part.name} is not a readable safetensors file .*re-run stage=cache_teacher"):
        run(make_cfg(*DATA, *CACHE, "teacher=cached", "loss=sparse_kl", "teacher_cache.encoding=topk",
                     f"teacher_cache.dir={directory}", output_dir=tmp_path / "r"))
    rows = sum(len(p["keys"]) for p in parts(built["topk"]))
    run(cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", "teacher_cache.encoding=topk", f"teacher_cache.dir={directory}"))
    assert not part.exists() and sum(len(p["keys"]) for p in parts(directory)) == rows


def test_stale_temporaries_of_an_interrupted_run_are_cleaned(tmp_path: Path, cache_dir: Path) -> None:
    """#16: hidden temporaries of a killed writer (dead pid, old) are removed by the next run."""
    import os

    target = tmp_path / "targets"
    target.mkdir()
    stale = [target / ".part-abc.safetensors.tmp-999999999-x", tmp_path / ".targets.tmp-999999999-y"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    for path in stale:
        os.utime(path, (0, 0))
    run(cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", f"teacher_cache.dir={target}"))
    assert not any(p.exists() for p in stale) and list(target.glob("covers-*.json"))


def _cache_as_rank(tmp: str, cache_dir: str, target: str, rank: int) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    run(cache_cfg(Path(tmp) / f"rank{rank}", Path(cache_dir), "stage=cache_teacher", "teacher_cache.encoding=topk",
                  f"teacher_cache.dir={target}"))


@pytest.mark.slow  # two spawned processes each import the stack: about 45 s on 2 busy cores
@pytest.mark.dist
def test_two_processes_fill_one_store_each_chunk_once(built, tmp_path: Path, cache_dir: Path) -> None:
    """Two writers (as DDP ranks 0 and 1) share stage=cache_teacher: every chunk is computed by one
    of them (no row stored twice), both finish with the split complete."""
    import multiprocessing

    target = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_cache_as_rank, args=(str(tmp_path), str(cache_dir), str(target), r)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    stored = [bytes(k.tolist()) for p in parts(target) for k in p["keys"]]
    expected = sum(len(p["keys"]) for p in parts(built["topk"]))
    assert len(stored) == len(set(stored)) == expected and list(target.glob("covers-*.json"))
    assert not list(target.glob(".claim-*")) and not list(target.glob(".*tmp*"))


def test_a_sweep_with_the_same_encoding_reads_the_offline_store(make_cfg, tmp_path: Path, cache_dir: Path) -> None:
    """One store, two ways in: rows stage=cache_teacher stored are read by teacher_outputs.reuse."""
    root = tmp_path / "store"
    common = (*DATA, "teacher_cache.encoding=topk", "teacher_cache.k=12", f"teacher_outputs.dir={root}")
    offline = Path(run(cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", *common[2:]))["teacher_targets"])
    assert offline.parent == root
    summary = run(make_cfg(*common, "teacher_outputs.reuse=true", "teacher_outputs.encoding=topk", "teacher_outputs.k=12",
                           "teacher_outputs.dtype=uint8", "baseline=false"))["teacher_outputs"]
    assert summary["directories"] == [str(offline)]
    alone = run(make_cfg(*DATA, "teacher_outputs.reuse=true", "teacher_outputs.encoding=topk", "teacher_outputs.k=12",
                         "teacher_outputs.dtype=uint8", f"teacher_outputs.dir={tmp_path / 'empty'}", "baseline=false",
                         output_dir=tmp_path / "alone"))["teacher_outputs"]
    # every training row (6 steps x 8) was read from the offline store; only evaluation rows were computed
    assert alone["computed_rows"] - summary["computed_rows"] == 6 * 8


def _foreign_claim(directory: Path, chunk: int, age_s: float, text: str = "4242 some-other-host") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".claim-{chunk}"
    path.write_text(text)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_a_stale_claim_from_another_host_is_taken_over_with_a_warning(tmp_path: Path, caplog) -> None:
    """#14: a writer on another host cannot be checked by pid; its claim is a lease that expires when
    its heartbeat (mtime) is older than teacher_cache.claim_timeout_s."""
    from kd_lightning.teachers.teacher_cache import _claim, _heartbeat

    fresh = _foreign_claim(tmp_path, 0, age_s=5)
    assert not _claim(tmp_path, 0, steal=True, timeout_s=600)  # alive elsewhere: wait for it
    assert fresh.read_text() == "4242 some-other-host"
    stale = _foreign_claim(tmp_path, 1, age_s=3600)
    assert not _claim(tmp_path, 1)  # not stealing: a plain claim never takes another's chunk
    assert not _claim(tmp_path, 1, steal=True, timeout_s=7200)  # within a longer lease
    with caplog.at_level(logging.WARNING, logger="kd_lightning"):
        assert _claim(tmp_path, 1, steal=True, timeout_s=600)
    assert stale.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert "chunk 1" in caplog.text and "pid 4242 on host some-other-host" in caplog.text and "claim_timeout_s=600" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".claim-0", ".claim-1"]  # nothing left behind
    # a claim never written (its writer died between creating and writing it) expires the same way
    empty = _foreign_claim(tmp_path, 2, age_s=3600, text="")
    assert _claim(tmp_path, 2, steal=True, timeout_s=600) and empty.read_text().startswith(str(os.getpid()))
    # the heartbeat keeps a claim alive: refreshed, it is no longer stale
    _foreign_claim(tmp_path, 3, age_s=3600)
    _heartbeat(tmp_path, 3)
    assert not _claim(tmp_path, 3, steal=True, timeout_s=600)


def test_cache_teacher_finishes_past_a_dead_writer_on_another_host(tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    """stage=cache_teacher with chunk 0 claimed by a dead writer elsewhere: it takes the chunk over once the
    lease (claim_timeout_s) has expired (the old code waited forever: here the wait is cut short)."""
    import kd_lightning.teachers.teacher_cache as tc

    target = tmp_path / "targets"
    _foreign_claim(target, 0, age_s=120)
    waits = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) > 20:
            raise TimeoutError("still waiting for the foreign claim")

    monkeypatch.setattr(tc.time, "sleep", sleep)
    cfg = cache_cfg(tmp_path, cache_dir, "stage=cache_teacher", "teacher_cache.encoding=topk", "teacher_cache.claim_timeout_s=60",
                    f"teacher_cache.dir={target}")
    run(cfg)
    assert list(target.glob("covers-*.json")) and not list(target.glob(".claim-*"))


def test_the_offline_store_takes_typed_options_and_shares_the_online_stores_location(make_cfg, tmp_path: Path) -> None:
    """`cache_teacher_targets` and `load_cached_teacher` take `TeacherCacheOptions` (frozen), never the
    config; `teacher_cache.*` and `teacher_outputs.*` with the same encoding find the same store."""
    import dataclasses
    import inspect

    from kd_lightning.run.settings import teacher_cache_options, teacher_output_options
    from kd_lightning.teachers.identity import teacher_store_location
    from kd_lightning.teachers.teacher_cache import TeacherCacheOptions, cache_teacher_targets, load_cached_teacher
    from tests.test_teacher_outputs import tiny_lm

    for fn in (cache_teacher_targets, load_cached_teacher):
        params = inspect.signature(fn).parameters
        assert "cfg" not in params and params["options"].annotation == "TeacherCacheOptions", fn.__name__
    same = ("teacher_outputs.encoding=topk", "teacher_outputs.k=12", "teacher_outputs.dtype=uint8",
            "teacher_cache.encoding=topk", "teacher_cache.k=12")
    cfg = make_cfg(*same, "teacher_cache.shard_size=64", "seed=3")
    options = teacher_cache_options(cfg)
    assert isinstance(options, TeacherCacheOptions) and options.shard_size == 64 and options.seed == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 4  # type: ignore[misc]
    online = teacher_output_options(cfg).store
    assert online == options.store and options.store.root == str(Path(cfg.paths.cache_dir) / "teacher_outputs")
    teacher = tiny_lm()
    assert (teacher_store_location(online, "moe", teacher, None)
            == teacher_store_location(options.store, "moe", teacher, None))
    with pytest.raises(ValueError, match="teacher=cached: no store directory given"):
        load_cached_teacher(dataclasses.replace(options, directory=None), datamodule=None)

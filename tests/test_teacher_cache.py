"""Offline sparse teacher targets: `stage=cache_teacher` writes them, `teacher=cached` trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from kd_lightning.losses.sparse import SparseTargets, sample_targets, topk_targets
from kd_lightning.stages import obtain_teacher
from kd_lightning.pipeline import run
from tests.conftest import column, compose_config, metrics_csv, tiny_overrides

# Smaller than the shared tiny data so that the teacher's pass over the training split takes ~1 s.
DATA = ("dataset.max_train_tokens=12000", "dataset.batch_size=8")
CACHE = ("teacher_cache.k=12", "teacher_cache.num_draws=12", "teacher_cache.shard_size=64")


def cache_cfg(tmp: Path, cache_dir: Path, *overrides: str):
    chosen = (*DATA, *CACHE, *overrides)
    return compose_config([*tiny_overrides(chosen), *chosen], tmp / "run", cache_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One cache per method, built once for the module: {method: directory}."""
    out = {}
    for method in ("sample", "topk"):
        tmp = tmp_path_factory.mktemp(f"cache_{method}")
        cfg = cache_cfg(tmp, cache_dir, "stage=cache_teacher", f"teacher_cache.method={method}",
                        f"teacher_cache.dir={tmp / 'targets'}")
        out[method] = Path(run(cfg)["teacher_targets"])
    return out


def dense(targets: SparseTargets, vocab: int) -> torch.Tensor:
    return torch.zeros(*targets.indices.shape[:-1], vocab).scatter_add_(-1, targets.indices.long(), targets.probs.float())


def test_cache_files_cover_every_training_sample_then_train(built, make_cfg, tmp_path: Path) -> None:
    directory = built["sample"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["k"] == 12 and manifest["method"] == "sample" and manifest["num_draws"] == 12
    assert manifest["seq_len"] == 64 and manifest["positions_per_sample"] == 63 and manifest["format_version"] == 1
    assert {"data_fingerprint", "tokenizer", "vocab_size", "temperature", "teacher", "num_samples"} <= set(manifest)
    assert manifest["teacher"]["name"] == "moe" and len(manifest["teacher"]["weights"]) == 16
    shards, first = manifest["shards"], 0
    assert len(shards) > 1 and shards[0]["file"] == "shard-00000.safetensors"
    for shard in shards:  # contiguous, complete, the documented dtypes and shapes
        assert shard["first_sample"] == first
        tensors = load_file(str(directory / shard["file"]))
        assert tensors["indices"].dtype == torch.int32 and tensors["probs"].dtype == torch.float32
        assert tensors["indices"].shape == tensors["probs"].shape == (shard["num_samples"] * 63, 12)
        first += shard["num_samples"]
    assert first == manifest["num_samples"]

    cfg = make_cfg(*DATA, *CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={directory}", "baseline=false")
    summary = run(cfg)
    losses = column(metrics_csv(Path(cfg.paths.output_dir)), "train/kd_loss")
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert set(summary["models"]) == {"student (KD)"} and "teacher:cached" in summary["notes"][0]
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teachers.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_cached_targets_equal_the_live_teachers(built, tmp_path: Path, cache_dir: Path, method: str) -> None:
    import hydra

    cfg = cache_cfg(tmp_path, cache_dir, f"teacher_cache.method={method}")
    datamodule = hydra.utils.instantiate(cfg.dataset)
    teacher = obtain_teacher(cfg, cfg.teacher, datamodule).eval()  # the session-cached tiny teacher
    datamodule.setup("fit")
    assert int(datamodule.datasets["train"][3]["index"]) == 3  # what the reader looks targets up by
    manifest = json.loads((built[method] / "manifest.json").read_text())
    parts = [load_file(str(built[method] / s["file"])) for s in manifest["shards"]]
    stored = SparseTargets(*(torch.cat([p[key] for p in parts]).view(-1, 63, 12) for key in ("indices", "probs")))
    generator = torch.Generator().manual_seed(int(cfg.seed))  # the writer's: seeded by `seed`, batches in order
    vocab, start = datamodule.vocab_size, 0
    for batch in DataLoader(datamodule.datasets["train"], batch_size=datamodule.eval_batch_size):
        with torch.no_grad():
            logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        counted = batch["labels"][:, 1:] != -100
        logits = logits.masked_fill(~counted.unsqueeze(-1), 0.0)
        live = topk_targets(logits, 12) if method == "topk" else sample_targets(logits, 12, generator=generator)
        rows = slice(start, start + len(logits))
        mine = SparseTargets(stored.indices[rows], stored.probs[rows])
        assert torch.allclose(dense(mine, vocab)[counted], dense(live, vocab)[counted], atol=1e-6)
        start += len(logits)
    assert start == manifest["num_samples"]
    sums = stored.probs.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5) and int(stored.indices.max()) < vocab


def test_mismatching_or_missing_cache_fails_before_training(built, make_cfg, tmp_path: Path) -> None:
    directory = built["sample"]
    base = ("teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={directory}", "baseline=false")
    with pytest.raises(ValueError, match=r"built for data fingerprint '[0-9a-f]{16}' but this run has '[0-9a-f]{16}'.*stage=cache_teacher"):
        run(make_cfg(*DATA, *CACHE, *base, "dataset.max_train_tokens=10000"))
    with pytest.raises(ValueError, match=r"data fingerprint"):
        run(make_cfg(*DATA, *CACHE, *base, "seed=1", output_dir=tmp_path / "seed"))
    with pytest.raises(ValueError, match=r"built for k 12 but this run has 8"):
        run(make_cfg(*DATA, *CACHE, *base, "teacher_cache.k=8", output_dir=tmp_path / "k"))
    with pytest.raises(ValueError, match=r"built for seq_len 64 but this run has 32"):
        run(make_cfg(*DATA, *CACHE, *base, "dataset.seq_len=32", output_dir=tmp_path / "len"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"no teacher-target cache at {missing}.*stage=cache_teacher"):
        run(make_cfg(*DATA, *CACHE, "teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={missing}", output_dir=tmp_path / "m"))
    with pytest.raises(ValueError, match=r"loss=sparse_kl"):
        run(make_cfg(*DATA, "teacher=cached", "loss=kl", f"teacher_cache.dir={directory}", output_dir=tmp_path / "l"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fit_width_pads_or_keeps_the_most_drawn_ids() -> None:
    from kd_lightning.teachers.teacher_cache import fit_width

    targets = SparseTargets(torch.tensor([[5, 2, 9]]), torch.tensor([[0.5, 0.3, 0.2]]))
    padded = fit_width(targets, 5)
    assert padded.indices.tolist() == [[5, 2, 9, 0, 0]] and torch.equal(padded.probs, torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]]))
    kept = fit_width(targets, 2)
    assert kept.indices.tolist() == [[5, 2]] and torch.allclose(kept.probs, torch.tensor([[0.625, 0.375]]))

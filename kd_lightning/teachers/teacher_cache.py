"""Offline sparse teacher targets: computed once (`stage=cache_teacher`), read back (`teacher=cached`).

Anshumann et al. 2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs": the
teacher's distribution is stored sparsely for every training position, either as Random-Sampling KD
targets (``num_draws`` draws, ``p̂_v = count_v / num_draws``, unbiased) or as its top-k (biased), so
distillation no longer runs the teacher at all.

Layout of a cache directory::

    manifest.json                 what the targets were built from (checked before training)
    shard-00000.safetensors       indices int32 [positions, k], probs float32|float16 [positions, k]
    shard-00001.safetensors       ... each for a contiguous range of training samples
    kd_manifest.json              completeness marker (kd_lightning.model_cache.write_atomically)

Positions are the ALIGNED ones: a window of ``seq_len`` tokens has ``seq_len - 1`` stored rows, row
``t`` being the teacher's prediction of token ``t + 1`` (what `DistillationModule.align` gives the
student), so no shift happens at read time. Sample ``i`` of the training split owns rows
``[i * (seq_len - 1), (i + 1) * (seq_len - 1))`` of the concatenated shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from kd_lightning.model_cache import cache_root, config_key, is_complete, write_atomically
from kd_lightning.data.tokenizer import tokenizer_identity
from kd_lightning.losses.sparse import SparseTargets, sample_targets, topk_targets
from kd_lightning.tasks import CausalLM

log = logging.getLogger("kd_lightning")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Fields a reader compares with the current run: a mismatch means the targets belong to other data.
CHECKED_FIELDS = {"data_fingerprint": "data fingerprint", "tokenizer": "tokenizer", "vocab_size": "vocabulary size",
                  "seq_len": "seq_len", "k": "k", "format_version": "format version"}
DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ---------------------------------------------------------------------------------------- identity
def weights_hash(model: nn.Module) -> str:
    """sha256[:16] of the teacher's parameters and buffers (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}\0".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def expected_fields(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """What a cache must have been built for to serve this run (compared with the manifest)."""
    # Specific fields first: the data fingerprint also covers the tokenizer and seq_len.
    return {"format_version": FORMAT_VERSION, "k": int(cfg.teacher_cache.k), "seq_len": int(datamodule.seq_len),
            "vocab_size": int(datamodule.vocab_size), "tokenizer": tokenizer_identity(datamodule.tokenizer)[:16],
            "data_fingerprint": datamodule.fingerprint()}


def method_params(cfg: DictConfig) -> dict[str, Any]:
    c = cfg.teacher_cache
    if c.method not in ("sample", "topk"):
        raise ValueError(f"teacher_cache.method={c.method!r}: must be 'sample' or 'topk'")
    if c.probs_dtype not in DTYPES:
        raise ValueError(f"teacher_cache.probs_dtype={c.probs_dtype!r}: must be one of {sorted(DTYPES)}")
    return {"method": str(c.method), "k": int(c.k), "num_draws": int(c.num_draws) if c.method == "sample" else None,
            "temperature": float(c.temperature), "probs_dtype": str(c.probs_dtype)}


def default_dir(cfg: DictConfig, name: str, teacher_identity: dict[str, Any], data_fingerprint: str) -> Path:
    key = config_key({"teacher": teacher_identity, "data": data_fingerprint, "method": method_params(cfg), "seed": int(cfg.seed)})
    return cache_root(cfg.paths.cache_dir) / "teacher_targets" / f"{name}-{key}"


# ---------------------------------------------------------------------------------------- writer
def batch_targets(teacher: nn.Module, batch: dict[str, Tensor], params: dict[str, Any],
                  generator: torch.Generator | None, counts: dict[str, int] | None = None) -> SparseTargets:
    """Aligned sparse targets [B, L-1, k] of one batch. Rows that no label counts (padding, prompt)
    get the uniform distribution's targets, as in `online_sparse_kl`: they are never read.
    `counts["truncated"]` (if given) adds the counted rows that drew more than k unique ids."""
    logits, labels = CausalLM.align(CausalLM.logits(teacher, batch).float(), batch["labels"])
    counted = CausalLM.mask(labels)
    logits = logits.masked_fill(~counted.unsqueeze(-1), 0.0)
    k, T = params["k"], params["temperature"]
    if params["method"] == "topk":
        return topk_targets(logits, k, temperature=T)
    targets = sample_targets(logits, params["num_draws"], temperature=T, generator=generator)
    if counts is not None and targets.indices.shape[-1] > k:
        counts["truncated"] += int(((targets.probs > 0).sum(-1) > k)[counted].sum())
    return fit_width(targets, k)


def fit_width(targets: SparseTargets, k: int) -> SparseTargets:
    """Pad with probability-0 entries, or keep the k most drawn ids renormalised when more than k
    unique ids were drawn (biased; never happens when k >= num_draws)."""
    width = targets.indices.shape[-1]
    if width < k:
        pad = (0, k - width)
        return SparseTargets(torch.nn.functional.pad(targets.indices, pad), torch.nn.functional.pad(targets.probs, pad))
    if width > k:
        probs, order = targets.probs.topk(k, dim=-1)
        return SparseTargets(targets.indices.gather(-1, order), probs / probs.sum(-1, keepdim=True))
    return targets


@torch.no_grad()
def cache_teacher_targets(cfg: DictConfig, datamodule: Any, teacher_cfg: DictConfig, teacher: nn.Module) -> Path:
    """`stage=cache_teacher`: the teacher's sparse targets for every training position, sharded."""
    if datamodule.task != "causal_lm":
        raise ValueError("stage=cache_teacher needs a causal-LM dataset")
    params = method_params(cfg)
    identity = {"name": str(teacher_cfg.name), "config": config_key(OmegaConf.to_container(teacher_cfg, resolve=True)),
                "weights": weights_hash(teacher)}
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    target = Path(str(cfg.teacher_cache.dir)) if cfg.teacher_cache.dir else default_dir(cfg, identity["name"], identity, datamodule.fingerprint())
    manifest = {**expected_fields(cfg, datamodule), **params, "teacher": identity, "seed": int(cfg.seed),
                "num_samples": len(dataset), "positions_per_sample": int(datamodule.seq_len) - 1,
                "aligned": "row t of a sample = teacher prediction of token t+1"}
    if is_complete(target):
        found = json.loads((target / MANIFEST).read_text())
        if {k: found.get(k) for k in manifest} == json.loads(json.dumps(manifest)):
            log.info("Teacher targets already cached at %s", target)
            return target
        raise FileExistsError(f"teacher_cache.dir={target} holds targets built from another teacher/data/method; "
                              "remove it or choose another teacher_cache.dir")
    device = torch.device("cuda" if torch.cuda.is_available() and str(cfg.trainer.get("accelerator")) != "cpu" else "cpu")
    teacher = teacher.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    shard_size = int(cfg.teacher_cache.shard_size)
    loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False)
    dtype = DTYPES[params["probs_dtype"]]

    def write(directory: Path) -> None:
        shards: list[dict[str, Any]] = []
        pending: list[SparseTargets] = []
        pending_samples = 0
        counts = {"truncated": 0}

        def flush() -> None:
            nonlocal pending, pending_samples
            indices = torch.cat([t.indices for t in pending]).flatten(0, 1).to(torch.int32)
            probs = torch.cat([t.probs for t in pending]).flatten(0, 1).to(dtype)
            name = f"shard-{len(shards):05d}.safetensors"
            first = sum(s["num_samples"] for s in shards)
            save_file({"indices": indices.contiguous(), "probs": probs.contiguous()}, str(directory / name),
                      metadata={"first_sample": str(first), "num_samples": str(pending_samples)})
            shards.append({"file": name, "first_sample": first, "num_samples": pending_samples})
            pending, pending_samples = [], 0

        for batch in tqdm(loader, desc=f"caching teacher targets ({params['method']}, k={params['k']})", unit="batch"):
            batch = {key: value.to(device) for key, value in batch.items()}
            targets = batch_targets(teacher, batch, params, generator, counts)
            indices, probs, start = targets.indices.cpu(), targets.probs.cpu(), 0
            while start < len(indices):  # a batch may straddle a shard border
                take = min(shard_size - pending_samples, len(indices) - start)
                pending.append(SparseTargets(indices[start:start + take], probs[start:start + take]))
                pending_samples, start = pending_samples + take, start + take
                if pending_samples == shard_size:
                    flush()
        if pending_samples:
            flush()
        if counts["truncated"]:
            log.warning("teacher_cache: %d counted positions drew more than k=%d unique ids from %d draws; their k most "
                        "drawn ids were kept, renormalised (biased). k >= num_draws never truncates",
                        counts["truncated"], params["k"], params["num_draws"])
        (directory / MANIFEST).write_text(json.dumps({**manifest, "shards": shards, "truncated_positions": counts["truncated"]},
                                                     indent=2, sort_keys=True))

    log.info("Caching teacher '%s' targets for %d training samples at %s", identity["name"], len(dataset), target)
    return write_atomically(target, write, {"kind": "teacher_targets", "manifest": MANIFEST})


# ---------------------------------------------------------------------------------------- reader
class CachedTeacher(nn.Module):
    """A teacher that is a table of sparse targets: `targets(batch)` looks the batch's samples up by
    their `index`. It has no parameters (nothing in checkpoints) and no logits."""

    sparse_targets = True

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.directory, self.manifest = directory, manifest
        rows, k = int(manifest["positions_per_sample"]), int(manifest["k"])
        parts = [load_file(str(directory / shard["file"])) for shard in manifest["shards"]]
        # Plain attributes, not buffers: the table stays out of checkpoints and on the CPU.
        self.indices = torch.cat([p["indices"] for p in parts]).view(-1, rows, k)
        self.probs = torch.cat([p["probs"] for p in parts]).view(-1, rows, k)
        self.vocab_size = int(manifest["vocab_size"])

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Aligned targets [B, seq_len - 1, k] of the batch's training samples."""
        if "index" not in batch:
            raise KeyError("teacher=cached needs the sample `index` in every training batch (LMDataset provides it)")
        index = batch["index"].cpu()
        device = batch["input_ids"].device
        return SparseTargets(self.indices[index].to(device, torch.long, non_blocking=True),
                             self.probs[index].to(device, torch.float32, non_blocking=True))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("teacher=cached has no logits, only sparse targets for the training split: it works with "
                           "the KD term of loss=sparse_kl, not with losses, callbacks or evaluations that need logits")


def load_cached_teacher(cfg: DictConfig, teacher_cfg: DictConfig, datamodule: Any) -> CachedTeacher:
    """The `teacher=cached` reader; fails before training when the cache does not fit this run."""
    build = "python train.py stage=cache_teacher teacher=<the teacher> teacher_cache.dir=<dir> (same dataset.* and teacher_cache.* settings)"
    if not teacher_cfg.get("dir"):
        raise ValueError(f"teacher=cached: no cache directory given; pass teacher_cache.dir=<dir> (or teacher.dir=) "
                         f"as printed by stage=cache_teacher; build one with: {build}")
    directory = Path(str(teacher_cfg.dir)).expanduser()
    path = directory / MANIFEST
    if not path.is_file() or not is_complete(directory):
        raise FileNotFoundError(f"teacher=cached: no teacher-target cache at {directory} (no {MANIFEST}); build it with: "
                                f"{build.replace('<dir>', str(directory))}")
    manifest = json.loads(path.read_text())
    for key, value in expected_fields(cfg, datamodule).items():
        if manifest.get(key) != value:
            raise ValueError(f"teacher=cached: cache {path} was built for {CHECKED_FIELDS[key]} {manifest.get(key)!r} "
                             f"but this run has {value!r}; rebuild it with stage=cache_teacher")
    datamodule.setup("fit")
    if manifest["num_samples"] != len(datamodule.datasets["train"]):
        raise ValueError(f"teacher=cached: cache {path} holds {manifest['num_samples']} training samples but this "
                         f"dataset has {len(datamodule.datasets['train'])}; rebuild it with stage=cache_teacher")
    log.info("Reading cached teacher targets (%s, k=%d) from %s", manifest["method"], manifest["k"], directory)
    return CachedTeacher(directory, manifest)


__all__ = ["CachedTeacher", "cache_teacher_targets", "load_cached_teacher", "weights_hash"]

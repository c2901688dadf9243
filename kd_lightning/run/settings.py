"""The config readers: which teachers a config names, and the typed options (frozen dataclasses)
that the code below the run layer receives instead of the Hydra config.

A leaf of the run package (it imports no other `kd_lightning.run` module), so the stages, builders
and checks can all use it without an import circle. The refusals are in `kd_lightning.run.checks`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.infra.model_cache import cache_root
from kd_lightning.teachers.encodings import Encoding
from kd_lightning.teachers.identity import StoreOptions
from kd_lightning.teachers.teacher_cache import DEFAULT_CLAIM_TIMEOUT_S, TeacherCacheOptions
from kd_lightning.teachers.teacher_outputs import RunContext, TeacherOutputOptions
from kd_lightning.teachers.vllm_client import ServedTeacherOptions


def teacher_configs(cfg: DictConfig) -> list[DictConfig]:
    """One teacher (`teacher=moe`) or several (`teacher.teachers: [...]`), names unique."""
    teachers = cfg.teacher.get("teachers")
    configs = list(teachers) if teachers else [cfg.teacher]
    names = [str(t.name) for t in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return configs


def encoding_options(node: Any) -> Encoding:
    """The `Encoding` of a store node (`teacher_outputs:` or `teacher_cache:`): `encoding`, `dtype`,
    `k`, `num_draws`, `temperature` (dtype null: float32 for `full`, else uint8)."""
    encoding = str(node.get("encoding") or "full")
    default_dtype = "float32" if encoding == "full" else "uint8"
    return Encoding(encoding=encoding, dtype=str(node.get("dtype") or default_dtype), k=int(node.get("k") or 32),
                    num_draws=int(node.get("num_draws") or 32), temperature=float(node.get("temperature") or 1.0))


def store_options(cfg: DictConfig, node: Any) -> StoreOptions:
    """Where teacher stores live and what keys them, with the encoding of `node`: the one root
    (`teacher_outputs.dir`, by default `<paths.cache_dir>/teacher_outputs`) of `teacher_outputs.reuse`,
    `stage=cache_teacher` and `teacher=cached`."""
    root = (cfg.get("teacher_outputs") or {}).get("dir") or cache_root(cfg.paths.cache_dir) / "teacher_outputs"
    return StoreOptions(root=str(root), encoding=encoding_options(node), precision=str(cfg.trainer.get("precision")),
                        accelerator=str(cfg.trainer.get("accelerator")))


def teacher_output_options(cfg: DictConfig) -> TeacherOutputOptions:
    """`teacher_outputs:` typed."""
    node = cfg.get("teacher_outputs") or {}
    return TeacherOutputOptions(reuse=bool(node.get("reuse", False)), store=store_options(cfg, node),
                                flush_rows=int(node.get("flush_rows", 1024)), max_gb=float(node.get("max_gb", 20)))


def teacher_output_context(cfg: DictConfig, task: str) -> RunContext:
    """What else decides whether a teacher's outputs can be reused in this run."""
    return RunContext(task=task, chunked=bool(cfg.loss.get("chunk_size")))


def teacher_cache_options(cfg: DictConfig, directory: Any = None) -> TeacherCacheOptions:
    """`teacher_cache:` typed; `directory` (a `teacher=cached` teacher's `dir`) replaces `teacher_cache.dir`."""
    node = cfg.teacher_cache
    chosen = directory if directory is not None else node.get("dir")
    return TeacherCacheOptions(store=store_options(cfg, node), directory=str(chosen) if chosen else None,
                               shard_size=int(node.get("shard_size") or 4096),
                               claim_timeout_s=float(node.get("claim_timeout_s") or DEFAULT_CLAIM_TIMEOUT_S),
                               tail=str(node.get("tail") or "uniform"), seed=int(cfg.seed))


def served_teacher_options(cfg: DictConfig, teacher_cfg: DictConfig) -> ServedTeacherOptions:
    """`teacher=vllm` typed: the servers, what they must serve, and how requests are sent."""
    urls = teacher_cfg.get("urls")
    urls = [urls] if isinstance(urls, str) else list(urls or [])
    defaults = ServedTeacherOptions()
    return ServedTeacherOptions(
        urls=tuple(str(u) for u in urls), served_model=str(teacher_cfg.get("served_model") or ""),
        top_k=int(teacher_cfg.get("top_k") or defaults.top_k),
        rows_per_request=int(teacher_cfg.get("rows_per_request") or defaults.rows_per_request),
        concurrency=int(teacher_cfg.get("concurrency") or defaults.concurrency),
        prefetch_batches=int(teacher_cfg.get("prefetch_batches", defaults.prefetch_batches)),
        timeout_s=float(teacher_cfg.get("timeout_s") or defaults.timeout_s),
        retries=int(teacher_cfg.get("retries", defaults.retries)),
        backoff_s=float(teacher_cfg.get("backoff_s", defaults.backoff_s)),
        probe_text=str(teacher_cfg.get("probe_text") or defaults.probe_text),
        tail=str(cfg.teacher_cache.get("tail") or "uniform"))


def model_config(teacher_cfg: DictConfig) -> Any:
    """A teacher's resolved model config as plain data (part of its store's identity), None if absent."""
    return OmegaConf.to_container(teacher_cfg.model, resolve=True) if teacher_cfg.get("model") is not None else None


def teacher_model_configs(cfg: DictConfig) -> dict[str, Any]:
    """Each teacher's resolved model config, by name."""
    return {str(t.name): model_config(t) for t in teacher_configs(cfg)}


def method_callbacks(cfg: DictConfig) -> list[Any]:
    """The method's callbacks: the `callbacks` group, then the temperature schedule and the loss's
    own schedule (TAID), each chosen by its group."""
    import hydra

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    for node in (cfg.temperature.get("callback"), cfg.loss.get("callback")):
        if node is not None:
            callbacks.append(hydra.utils.instantiate(node))
    return callbacks


__all__ = ["encoding_options", "method_callbacks", "model_config", "served_teacher_options",
           "store_options", "teacher_cache_options", "teacher_configs", "teacher_model_configs", "teacher_output_context",
           "teacher_output_options"]

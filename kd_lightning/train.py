"""`run(cfg)`: config -> data, teachers, student -> `Trainer.fit` -> saved student + summary.

Kept separate from the `@hydra.main` wrapper (`kd_lightning.cli`) so tests call it directly with a
composed config.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kd_lightning.callbacks.interrupt import CheckpointOnSigterm
from kd_lightning.callbacks.timing import FitTimer
from kd_lightning.evaluate import evaluate, print_summary
from kd_lightning.models import count_parameters, output_size, save_model
from kd_lightning.module import DistillationModule
from kd_lightning.stages import build_model, make_trainer, obtain_baseline, obtain_teacher
from kd_lightning.teachers.memo import flush_stores, memoize_teachers, reuse_summary

log = logging.getLogger("kd_lightning")

LM_BUILDERS = ("kd_lightning.models.build_causal_lm", "kd_lightning.models.from_pretrained")
CLASSIFIER_BUILDERS = ("kd_lightning.models.build_mlp",)
STAGES = ("distill", "teacher", "takd", "cache_teacher")


def teacher_configs(cfg: DictConfig) -> list[DictConfig]:
    """One teacher (`teacher=moe`) or several (`teacher.teachers: [...]`)."""
    teachers = cfg.teacher.get("teachers")
    configs = list(teachers) if teachers else [cfg.teacher]
    names = [str(t.name) for t in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"teacher names must be unique, got {names}")
    return configs


def check_config(cfg: DictConfig, datamodule: Any) -> None:
    """Fail before any compute, naming the offending key and value."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage!r} is not one of {list(STAGES)}")
    wrong = CLASSIFIER_BUILDERS if datamodule.task == "causal_lm" else LM_BUILDERS
    cached = [str(t.name) for t in teacher_configs(cfg) if t.get("cached")]
    if cached and (cfg.stage == "cache_teacher" or len(teacher_configs(cfg)) > 1 or cfg.loss.name != "sparse_kl"):
        raise ValueError(f"teacher={cached[0]} (offline sparse targets) is the only teacher of a stage=distill run with "
                         f"loss=sparse_kl; got stage={cfg.stage}, loss={cfg.loss.name}, {len(teacher_configs(cfg))} teacher(s)")
    for key, model_cfg in [("student", cfg.student.model)] + [(f"teacher {t.name}", t.model) for t in teacher_configs(cfg)]:
        if model_cfg is not None and model_cfg.get("_target_") in wrong:
            fix = "teacher=mlp student=mlp (or experiment=digits)" if datamodule.task == "classification" else "a causal LM (teacher=moe|dense|hf, student=tiny|hf)"
            raise ValueError(f"{key} model {model_cfg._target_} does not fit dataset {type(datamodule).__name__} "
                             f"(task {datamodule.task}); use {fix}")
    trainer = cfg.trainer
    strategy, accelerator = str(trainer.get("strategy")), str(trainer.get("accelerator"))
    if (strategy.startswith("fsdp") or strategy.startswith("deepspeed") or accelerator == "gpu") and not torch.cuda.is_available():
        raise RuntimeError(f"strategy={strategy} (accelerator={accelerator}) needs a CUDA GPU and none is visible; "
                           "use strategy=cpu, ddp or bf16 on this machine")
    if strategy.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise RuntimeError("strategy=deepspeed needs the extra: pip install -e '.[deepspeed]'") from err


def check_vocabularies(student: torch.nn.Module, teachers: dict[str, torch.nn.Module], cfg: DictConfig, datamodule: Any) -> None:
    student_size = output_size(student)
    if datamodule.task == "causal_lm" and student_size < len(datamodule.tokenizer):
        raise ValueError(f"student has {student_size} output logits but the tokenizer has {len(datamodule.tokenizer)} tokens")
    if cfg.loss.get("cross_vocab", False):
        return
    for name, teacher in teachers.items():
        if getattr(teacher, "sparse_targets", False):  # its manifest was checked against the tokenizer
            continue
        if output_size(teacher) != student_size:
            raise ValueError(f"teacher '{name}' has vocabulary size {output_size(teacher)} but the student has "
                             f"{student_size}; distilling across vocabularies needs a cross-vocabulary loss (loss=uld)")


def guard_output_dir(output_dir: Path, resume: Any) -> None:
    if resume is None and (output_dir / "summary.json").exists():
        raise FileExistsError(f"{output_dir} already holds a finished run (summary.json); choose another "
                              "hydra.run.dir or pass resume=auto to continue it")


def resolve_resume(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.resume in (None, "", "null"):
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if cfg.resume == "auto" else Path(str(cfg.resume))
    if cfg.resume == "auto" and not path.exists():
        log.info("resume=auto: no checkpoint at %s, starting fresh", path)
        return None
    if not path.exists():
        raise FileNotFoundError(f"resume={cfg.resume}: no checkpoint at {path}")
    return str(path)


def method_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # A temperature schedule and a loss's own schedule (TAID) are callbacks chosen by their group.
    for node in (cfg.temperature.get("callback"), cfg.loss.get("callback")):
        if node is not None:
            callbacks.append(hydra.utils.instantiate(node))
    return callbacks


def build_module(cfg: DictConfig, student: torch.nn.Module, teachers: dict[str, torch.nn.Module]) -> DistillationModule:
    d = cfg.distill
    return DistillationModule(
        student, teachers, hydra.utils.instantiate(cfg.loss.fn),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.lr_scheduler else None,
        kd_weight=d.kd_weight, ce_weight=d.ce_weight, kd_temperature=cfg.temperature.initial,
        teacher_combine=d.teacher_combine, teacher_weights=OmegaConf.to_object(d.teacher_weights) if d.teacher_weights else None,
        chunk_size=cfg.loss.get("chunk_size"), save_teachers=d.save_teachers,
        nonfinite_teacher=d.get("nonfinite_teacher", "error"),
    )


def quiet_lightning_console() -> None:
    """`import lightning` adds its own console handler that also propagates to the root logger;
    under Hydra (which configures the root logger) every Lightning message would print twice."""
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if isinstance(handler, logging.StreamHandler):
                lightning_logger.removeHandler(handler)


def set_cpu_threads(requested: int | None) -> None:
    """Intra-op CPU threads. Default: half the cores (1 on a 2-core box). Measured here: with 2
    threads on 2 cores, any other busy process makes OpenMP spin-waits turn a 0.26 s step into
    3-6 s, while 1 thread loses only ~25% on an idle machine. OMP_NUM_THREADS, if set, wins."""
    if "OMP_NUM_THREADS" in os.environ and requested is None:
        return
    torch.set_num_threads(int(requested) if requested else max(1, (os.cpu_count() or 2) // 2))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one configured experiment; returns the summary (empty on non-zero DDP ranks)."""
    quiet_lightning_console()
    set_cpu_threads(cfg.get("cpu_threads"))
    # Teachers are in eval mode by design (frozen); Lightning warns about any eval-mode submodule.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.dataset)
    check_config(cfg, datamodule)
    if os.environ.get("LOCAL_RANK", "0") == "0":
        guard_output_dir(output_dir, cfg.resume)
    output_dir.mkdir(parents=True, exist_ok=True)

    if cfg.stage == "takd":  # a chain of runs: teacher -> assistants -> student
        from kd_lightning.takd import run_chain

        return run_chain(cfg)
    teachers = {str(t.name): obtain_teacher(cfg, t, datamodule) for t in teacher_configs(cfg)}
    if cfg.stage == "cache_teacher":  # offline sparse targets of the (single) teacher, then stop
        from kd_lightning.teachers.cached import cache_teacher_targets

        if len(teachers) != 1:
            raise ValueError(f"stage=cache_teacher caches one teacher, got {list(teachers)}")
        directory = cache_teacher_targets(cfg, datamodule, teacher_configs(cfg)[0], next(iter(teachers.values())))
        log.info("Teacher targets at %s; train with: teacher=cached loss=sparse_kl teacher_cache.dir=%s", directory, directory)
        return {"teacher_targets": str(directory)}
    if cfg.stage == "teacher":
        log.info("Teacher(s) ready: %s", ", ".join(teachers))
        return {"teachers": list(teachers)}

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, datamodule, int(cfg.seed))
    check_vocabularies(student, teachers, cfg, datamodule)
    extra_callbacks = method_callbacks(cfg)
    # teacher_outputs.reuse: frozen teachers read their outputs from a store shared by the runs of a sweep
    teachers = memoize_teachers(cfg, teacher_configs(cfg), teachers, datamodule, extra_callbacks)
    module = build_module(cfg, student, teachers)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    timer = FitTimer()
    callbacks = [timer, hydra.utils.instantiate(cfg.checkpoint), CheckpointOnSigterm(), *extra_callbacks]
    trainer = make_trainer(cfg, name="distill", callbacks=callbacks, loggers=loggers or False, checkpoint=True)
    log.info("Distilling %s -> student '%s' (%s params) with loss=%s", ", ".join(teachers), cfg.student.name,
             f"{count_parameters(student):,}", cfg.loss.name)
    try:
        # weights_only: a checkpoint is loaded without unpickling arbitrary objects.
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg, output_dir), weights_only=True)
    except SIGTERMException as interrupted:  # checkpoint already written by CheckpointOnSigterm
        raise SystemExit(128 + signal.SIGTERM) from interrupted
    finally:
        flush_stores(teachers)  # stored teacher outputs are written even when the run stops early

    baseline = obtain_baseline(cfg, datamodule)[0] if cfg.baseline else None
    if not trainer.is_global_zero:
        return {}
    student_dir = save_model(student, output_dir / "student", getattr(datamodule, "tokenizer", None))
    summary = summarize(cfg, datamodule, teachers, student, baseline)
    summary["student_dir"] = str(student_dir)
    summary["timing"] = timer.summary(trainer.world_size)
    reuse = reuse_summary(teachers)
    if reuse is not None:
        summary["teacher_outputs"] = reuse
        log.info("teacher_outputs: %d rows read from the store (about %.1f s of teacher time saved, %.1f s reading), "
                 "%d computed (%.1f s)", reuse["hit_rows"], reuse["saved_seconds"], reuse["lookup_seconds"],
                 reuse["computed_rows"], reuse["computed_seconds"])
    if "val/student_loss" in trainer.callback_metrics:
        summary["val_student_loss"] = float(trainer.callback_metrics["val/student_loss"])
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary["models"], datamodule.task, str(student_dir), title=f"kd-lightning: loss={cfg.loss.name}")
    return summary


def summarize(cfg: DictConfig, datamodule: Any, teachers: dict[str, torch.nn.Module], student: torch.nn.Module,
              baseline: torch.nn.Module | None) -> dict[str, Any]:
    """Held-out (test split) loss/perplexity of every teacher, the distilled student and the baseline."""
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    # A cached teacher is a table of training-split targets: nothing to evaluate on the test split.
    cached = [n for n, t in teachers.items() if getattr(t, "sparse_targets", False)]
    teachers = {n: t for n, t in teachers.items() if n not in cached}
    first_teacher = next(iter(teachers.values()), None)
    rows: dict[str, dict[str, float]] = {}
    for name, teacher in teachers.items():
        rows[f"teacher:{name}"] = evaluate(teacher, batches, datamodule.task)
    rows["student (KD)"] = evaluate(student, batches, datamodule.task, reference=first_teacher)
    if baseline is not None:
        rows["student (CE only)"] = evaluate(baseline, batches, datamodule.task, reference=first_teacher)
    for name, model in [*((f"teacher:{n}", t) for n, t in teachers.items()), ("student (KD)", student),
                        ("student (CE only)", baseline)]:
        if model is not None:
            rows[name]["params"] = count_parameters(model)
    summary = {"loss": str(cfg.loss.name), "seed": int(cfg.seed), "task": datamodule.task, "models": rows}
    if cached:
        summary["notes"] = [f"teacher:{n} not evaluated: offline sparse targets of the training split (no model)" for n in cached]
        log.info("%s", summary["notes"][0])
    return summary

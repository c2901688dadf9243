"""The distillation stage: config -> teachers, student, `DistillationModule` -> `Trainer.fit` -> saved
student + summary. `kd_lightning.run.pipeline.run` dispatches here for `stage=distill`, and a TAKD chain
calls `distill` once per link.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from kd_lightning.infra.atomic import atomic_directory, atomic_write_text
from kd_lightning.callbacks.interrupt import CheckpointOnSigterm
from kd_lightning.callbacks.timing import FitTimer
from kd_lightning.run.settings import (method_callbacks, teacher_configs, teacher_model_configs, teacher_output_context,
                                       teacher_output_options)
from kd_lightning.cross_tokenizer import byte_lengths_of, refuse_foreign_tokens, teacher_batches, teacher_tokenization_args
from kd_lightning.evaluate import evaluate, print_summary, with_progress
from kd_lightning.infra.resume_history import load_resume_history
from kd_lightning.infra.signals import exit_on_sigterm
from kd_lightning.models import count_parameters, output_size, save_model
from kd_lightning.module import DistillationModule
from kd_lightning.infra.sharding import unsharded
from kd_lightning.run.builders import (build_model, check_model_positions, make_trainer, obtain_baseline, obtain_teacher,
                                      shards_models)
from kd_lightning.tasks import task_named
from kd_lightning.teachers.teacher_outputs import TeacherOutputsFlush, memoize_teachers
from kd_lightning.teachers.vllm_client import TeacherUnavailable

log = logging.getLogger("kd_lightning")


CROSS_TOKENIZER_OPTIONS = ("distilling across tokenizers needs the teacher's own tokenizer (teacher.tokenizer=<path>; "
                           "the data then carries both tokenizations) and a cross-tokenizer loss (loss=uld or "
                           "loss=span_kl); see docs/cross_tokenizer.md")


def check_vocabularies(student: torch.nn.Module, teachers: dict[str, torch.nn.Module], *, cross_vocab: bool,
                       tokenizer_size: int | None, teacher_tokenizer_size: int | None = None) -> None:
    """The student covers the tokenizer; every teacher has the student's vocabulary, or, when the
    data carries the teacher's own tokenization (`teacher_tokenizer_size`), covers that tokenizer
    and the loss is cross-tokenizer. A teacher never reads another tokenizer's ids: different
    vocabularies on single-tokenized data are refused even for a cross-vocabulary loss."""
    student_size = output_size(student)
    if tokenizer_size is not None and student_size < tokenizer_size:
        raise ValueError(f"student has {student_size} output logits but the tokenizer has {tokenizer_size} tokens")
    for name, teacher in teachers.items():
        if getattr(teacher, "sparse_targets", False):  # its manifest was checked against the tokenizer
            continue
        teacher_size = output_size(teacher)
        if teacher_tokenizer_size is not None:
            if not cross_vocab:
                raise ValueError(f"teacher '{name}' reads its own tokenization (dual data) but the loss compares one "
                                 "vocabulary; use loss=uld or loss=span_kl")
            if teacher_size < teacher_tokenizer_size:
                raise ValueError(f"teacher '{name}' has {teacher_size} output logits but its tokenizer has "
                                 f"{teacher_tokenizer_size} tokens")
        elif teacher_size != student_size:
            why = ("the data holds one tokenization, so the teacher would read the student's ids" if cross_vocab
                   else "a same-tokenizer loss compares the two distributions token for token")
            raise ValueError(f"teacher '{name}' has vocabulary size {teacher_size} but the student has {student_size}; "
                             f"{why}. {CROSS_TOKENIZER_OPTIONS}")


def build_module(cfg: DictConfig, student: torch.nn.Module, teachers: dict[str, torch.nn.Module],
                 **data_args: Any) -> DistillationModule:
    """The LightningModule from its config node (`module:` in conf/train.yaml, a `_target_`), with
    the built student and teachers passed in, plus what the data decides (`data_args`: the teacher's
    tokenization and the shared vocabulary of a cross-tokenizer run)."""
    factory = hydra.utils.instantiate(cfg.module, _partial_=True, _convert_="all")
    return factory(student=student, teachers=teachers, **data_args)


def distill(cfg: DictConfig, datamodule: Any, ckpt_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Distil one student, continuing from `ckpt_path` when given (the caller resolved `resume`:
    `pipeline.run` through `rundir.start_run`, a TAKD stage through `rundir.resolve_resume`);
    returns the summary (empty on non-zero DDP ranks)."""
    output_dir = Path(cfg.paths.output_dir)
    teacher_cfgs = teacher_configs(cfg)
    refuse_foreign_tokens({str(t.name): t.get("tokenizer") for t in teacher_cfgs}, datamodule)
    sharded = shards_models(cfg)  # strategy=fsdp: models built on the meta device, filled shard by shard
    teachers = {str(t.name): obtain_teacher(cfg, t, datamodule, deferred=sharded) for t in teacher_cfgs}
    # The student's run starts from the same RNG state whether its teachers were trained just now
    # (which draws random numbers) or loaded from the cache.
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.model, datamodule, int(cfg.seed), deferred=sharded)
    check_model_positions("student.model", student, cfg)
    dual = getattr(datamodule, "teacher_tokenizer", None)
    check_vocabularies(student, teachers, cross_vocab=bool(cfg.loss.get("cross_vocab", False)),
                       tokenizer_size=len(datamodule.tokenizer) if datamodule.task == "causal_lm" else None,
                       teacher_tokenizer_size=len(dual) if dual is not None else None)
    extra_callbacks = method_callbacks(cfg)
    # teacher_outputs.reuse: frozen teachers read their outputs from a store shared by the runs of a sweep
    outputs = teacher_output_options(cfg)
    teachers = memoize_teachers(outputs, teachers, teacher_model_configs(cfg), teacher_output_context(cfg, datamodule.task),
                                extra_callbacks)
    data_args = teacher_tokenization_args(datamodule, cfg.paths.cache_dir, outputs.reuse)
    module = build_module(cfg, student, teachers, **data_args)
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    timer, stores = FitTimer(), TeacherOutputsFlush(teachers)
    on_sigterm = CheckpointOnSigterm()
    callbacks = [timer, stores, hydra.utils.instantiate(cfg.checkpoint), on_sigterm, *extra_callbacks]
    trainer = make_trainer(cfg, name="distill", callbacks=callbacks, loggers=loggers or False, checkpoint=True)
    log.info("Distilling %s -> student '%s' (%s params) with loss=%s", ", ".join(teachers), cfg.student.name,
             f"{count_parameters(student):,}", cfg.loss.name)
    served = [t for t in teachers.values() if hasattr(t, "prefetch")]  # teacher=vllm: requests sent ahead of the step
    for teacher in served:
        datamodule.read_ahead(teacher.options.prefetch_batches, teacher.prefetch)
    with exit_on_sigterm("distillation", saved=lambda: on_sigterm.saved), stop_on_lost_teacher(on_sigterm, served):
        # weights_only: a checkpoint is loaded without unpickling arbitrary objects.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)

    # strategy=fsdp: the student whole again (a collective) for saving; the frozen teachers stay
    # sharded, the summary scores them with collective forwards (`evaluate`)
    student = unsharded(student, lambda: build_model(cfg.student.model, datamodule, int(cfg.seed)))
    baseline = obtain_baseline(cfg, datamodule)[0] if cfg.baseline else None
    student_dir = output_dir / "student"
    # the fit is over and its last.ckpt written: a resume=auto only redoes what follows
    finished = getattr(trainer.checkpoint_callback, "last_model_path", None) or None
    with exit_on_sigterm("the held-out evaluation and saving", saved=finished):
        if trainer.is_global_zero:
            with atomic_directory(student_dir) as staging:
                save_model(student, staging, getattr(datamodule, "tokenizer", None))
        # every rank scores its part of the test split on its device; the counts are reduced over ranks
        summary = summarize(datamodule, teachers, student, baseline, loss=str(cfg.loss.name), seed=int(cfg.seed),
                            progress=bool(cfg.trainer.get("enable_progress_bar", True)) and trainer.is_global_zero,
                            device=trainer.strategy.root_device)
        if not trainer.is_global_zero:
            return {}
        summary["student_dir"] = str(student_dir)
        summary["timing"] = timer.summary(trainer.world_size)
        history = load_resume_history(output_dir)
        if history:  # +resume_allow_changes=true: what changed, and from which step
            summary["resume_history"] = history
        reuse = stores.summary()
        if reuse is not None:
            summary["teacher_outputs"] = reuse
            log.info("teacher_outputs: %d rows read from the store (about %.1f s of teacher time saved, %.1f s "
                     "reading), %d computed (%.1f s)", reuse["hit_rows"], reuse["saved_seconds"],
                     reuse["lookup_seconds"], reuse["computed_rows"], reuse["computed_seconds"])
        for name, teacher in teachers.items():
            if hasattr(teacher, "prefetch"):  # teacher=vllm: rows scored, seconds the steps waited for answers
                summary.setdefault("served_teachers", {})[name] = {**teacher.stats, "retried": teacher.client.retried}
        if "val/student_loss" in trainer.callback_metrics:
            summary["val_student_loss"] = float(trainer.callback_metrics["val/student_loss"])
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary["models"], datamodule.task, str(student_dir), title=f"kd-lightning: loss={cfg.loss.name}")
    return summary


@contextmanager
def stop_on_lost_teacher(on_sigterm: CheckpointOnSigterm, served: list[torch.nn.Module]) -> Iterator[None]:
    """A served teacher that stopped answering ends the fit with `TeacherUnavailable`: say what was
    saved and how to continue. The served teachers' request threads are stopped in any case."""
    try:
        yield
    except TeacherUnavailable as error:
        saved = (f"the last finished step is saved at {on_sigterm.saved}; start the server(s) again and rerun with "
                 "resume=auto to continue" if on_sigterm.saved else
                 "nothing was saved now (several processes: resume=auto continues from the last periodic checkpoint)")
        log.error("%s; %s", error, saved)
        raise TeacherUnavailable(f"{error}; {saved}") from error
    finally:
        for teacher in served:
            teacher.close()


def summarize(datamodule: Any, teachers: dict[str, torch.nn.Module], student: torch.nn.Module,
              baseline: torch.nn.Module | None, *, loss: str, seed: int, progress: bool = False,
              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Held-out (test split) loss/perplexity of every teacher, the distilled student and the baseline,
    on `device`, each under a progress bar when `progress`. Inside a process group every rank calls it
    and scores its share of the split."""
    task = task_named(datamodule.task)
    datamodule.setup("test")
    batches = datamodule.test_dataloader()  # streamed once per model, never held as a list
    # A cached teacher is a table of training-split targets: nothing to evaluate on the test split.
    cached = [n for n, t in teachers.items() if getattr(t, "sparse_targets", False)]
    skipped = {n: t for n, t in teachers.items() if n in cached}
    teachers = {n: t for n, t in teachers.items() if n not in cached}
    # A teacher with its own tokenization reads its side of the dual batches; no top-1 agreement then.
    own = teacher_batches(datamodule, batches)
    first_teacher = next(iter(teachers.values()), None) if own is None else None
    student_bytes, teacher_bytes = byte_lengths_of(datamodule)
    rows: dict[str, dict[str, float]] = {}
    for name, teacher in teachers.items():
        rows[f"teacher:{name}"] = evaluate(teacher, with_progress(batches if own is None else own, f"held-out: teacher:{name}", progress),
                                           task, device=device, byte_lengths=teacher_bytes)
    rows["student (KD)"] = evaluate(student, with_progress(batches, "held-out: student (KD)", progress), task,
                                    reference=first_teacher, device=device, byte_lengths=student_bytes)
    if baseline is not None:
        rows["student (CE only)"] = evaluate(baseline, with_progress(batches, "held-out: student (CE only)", progress),
                                             task, reference=first_teacher, device=device, byte_lengths=student_bytes)
    for name, model in [*((f"teacher:{n}", t) for n, t in teachers.items()), ("student (KD)", student),
                        ("student (CE only)", baseline)]:
        if model is not None:
            rows[name]["params"] = count_parameters(model)
    summary = {"loss": loss, "seed": seed, "task": task.name, "models": rows}
    if cached:
        summary["notes"] = [f"teacher:{n} not evaluated: " + getattr(
            t, "evaluation_note", "offline sparse targets of the training split (no model)")
            for n, t in skipped.items()]
        log.info("%s", summary["notes"][0])
    return summary

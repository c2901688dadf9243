"""TAKD: distil through a chain of teacher assistants, teacher -> TA_1 -> ... -> TA_n -> student.

"Improved Knowledge Distillation via Teacher Assistant" (Mirzadeh et al., AAAI 2020). Every stage is
an ordinary `kd_lightning.run.distill.distill` on a derived config: stage 1 distils the first assistant from
the configured teacher, stage i+1 distils the next model from stage i's saved student directory.
`python train.py experiment=takd` runs the chain (stage=takd) with the `takd:` node:

    takd.assistants: [{name, model}, ...]   explicit assistant configs (largest first), or
    takd.num_assistants: n                  sizes proposed geometrically in parameter count
                                            (`propose_assistant_sizes`), realised by widening the
                                            student's architecture (hidden sizes)
    takd.compare_direct: bool               also distil the student directly from the teacher

Stage i writes to <output_dir>/stage<i>_<name>/ (its own checkpoints, logs and summary.json); the
chain's summary (held-out loss of every model in the chain) goes to <output_dir>/summary.json. With
`resume=auto` stages whose summary.json exists are skipped and an unfinished one continues from its
last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.infra.atomic import atomic_write_text
from kd_lightning.run.settings import teacher_configs
from kd_lightning.evaluate import print_summary
from kd_lightning.models import builds, count_parameters, load_model
from kd_lightning.infra.rundir import begin_run
from kd_lightning.infra.signals import exit_on_sigterm
from kd_lightning.run.builders import model_kwargs
from kd_lightning.run.distill import distill

log = logging.getLogger("kd_lightning")


def propose_assistant_sizes(teacher_params: int, student_params: int, n: int) -> list[int]:
    """`n` assistant sizes spaced geometrically between teacher and student parameter counts,
    largest first: size_i = student · (teacher / student)^((n + 1 − i) / (n + 1)), i = 1..n."""
    if n < 0:
        raise ValueError(f"takd.num_assistants must be >= 0, got {n}")
    if teacher_params <= student_params:
        raise ValueError(f"TAKD needs a teacher larger than the student "
                         f"({teacher_params:,} <= {student_params:,} parameters)")
    ratio = teacher_params / student_params
    return [round(student_params * ratio ** ((n + 1 - i) / (n + 1))) for i in range(1, n + 1)]


@builds("classification")
def load_saved_model(directory: str, **_: Any) -> nn.Module:
    """A classifier saved by an earlier stage (`kd_lightning.models.save_model`), as a teacher
    (causal LMs come back through `kd_lightning.models.from_pretrained`)."""
    return load_model(directory)


def count_model_parameters(model_cfg: DictConfig, datamodule: Any, seed: int = 0) -> int:
    """Parameter count of the model a config builds, on the meta device (no memory; builders of
    saved models read only their config there)."""
    with torch.device("meta"):
        return count_parameters(hydra.utils.instantiate(model_cfg, **model_kwargs(datamodule, seed)))


def widen(model_cfg: DictConfig, scale: float) -> DictConfig:
    """The student's architecture with its widths multiplied by `scale`: MLP `hidden_sizes`, or a
    transformers config's hidden/intermediate sizes (hidden rounded to a multiple of 2 × heads, so the
    rotary head dimension stays even)."""
    cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    if "hidden_sizes" in cfg:
        cfg.hidden_sizes = [max(1, round(w * scale)) for w in cfg.hidden_sizes]
        return cfg
    config = cfg.get("config")
    if config is None or "hidden_size" not in config:
        raise ValueError(f"TAKD cannot derive assistant sizes from student model {model_cfg.get('_target_')}: "
                         "it needs `hidden_sizes` (MLP) or `config.hidden_size`; give takd.assistants explicitly")
    step = 2 * int(config.get("num_attention_heads", 1))
    config.hidden_size = max(step, round(config.hidden_size * scale / step) * step)
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if config.get(key):
            config[key] = max(1, round(config[key] * scale))
    if config.get("head_dim"):
        config.head_dim = config.hidden_size // int(config.num_attention_heads)
    return cfg


def assistant_model(student_model: DictConfig, target_params: int, datamodule: Any, seed: int) -> tuple[DictConfig, int]:
    """The widening of the student whose parameter count is closest (in log) to `target_params`."""
    best: tuple[float, DictConfig, int] | None = None
    low, high = 0.0, math.log(1024.0)  # scale between 1 and 1024
    for _ in range(20):  # bisection on log(scale); parameter count grows with the scale
        mid = (low + high) / 2
        cfg = widen(student_model, math.exp(mid))
        params = count_model_parameters(cfg, datamodule, seed)
        gap = abs(math.log(params / target_params))
        if best is None or gap < best[0]:
            best = (gap, cfg, params)
        low, high = (mid, high) if params < target_params else (low, mid)
    assert best is not None
    return best[1], best[2]


def chain_members(cfg: DictConfig, datamodule: Any) -> list[DictConfig]:
    """Assistants (largest first) then the student, each `{name, model}`."""
    takd = cfg.takd
    seed = int(cfg.seed)
    members: list[DictConfig] = []
    if takd.get("assistants"):
        for i, entry in enumerate(takd.assistants, 1):
            entry = entry if "model" in entry else OmegaConf.create({"model": entry})
            members.append(OmegaConf.create({"name": str(entry.get("name") or f"ta{i}"), "model": entry.model}))
    else:
        teacher_params = count_model_parameters(cfg.teacher.model, datamodule, seed)
        student_params = count_model_parameters(cfg.student.model, datamodule, seed)
        sizes = propose_assistant_sizes(teacher_params, student_params, int(takd.get("num_assistants", 1)))
        for i, size in enumerate(sizes, 1):
            model_cfg, params = assistant_model(cfg.student.model, size, datamodule, seed)
            log.info("TAKD: assistant ta%d has %s parameters (target %s; teacher %s, student %s)", i,
                     f"{params:,}", f"{size:,}", f"{teacher_params:,}", f"{student_params:,}")
            members.append(OmegaConf.create({"name": f"ta{i}", "model": model_cfg}))
    members.append(OmegaConf.create({"name": str(cfg.student.name), "model": cfg.student.model}))
    return members


def saved_student_teacher(name: str, student_dir: str, task: str) -> dict[str, Any]:
    """Teacher config for the model an earlier stage saved (`teacher=hf` style for causal LMs)."""
    if task == "causal_lm":
        model = {"_target_": "kd_lightning.models.from_pretrained", "pretrained": student_dir,
                 "torch_dtype": None, "trust_remote_code": False}
    else:
        model = {"_target_": "kd_lightning.run.takd.load_saved_model", "directory": student_dir}
    return {"name": name, "model": model, "pretrain": None}


def stage_config(cfg: DictConfig, teacher: dict[str, Any] | DictConfig, student: DictConfig, output_dir: Path,
                 baseline: bool) -> DictConfig:
    """The chain's config turned into one ordinary distillation run."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("takd", None)
    data.update(stage="distill", baseline=bool(baseline), resume="auto" if cfg.resume == "auto" else None,
                teacher=OmegaConf.to_container(teacher, resolve=True) if isinstance(teacher, DictConfig) else teacher,
                student=OmegaConf.to_container(student, resolve=True))
    data["paths"]["output_dir"] = str(output_dir)
    for logger in (data.get("logger") or {}).values():  # W&B-style loggers: one run per stage, grouped
        if isinstance(logger, dict) and "group" in logger:
            logger["name"] = logger.get("name") or output_dir.name
            logger["group"] = logger.get("group") or output_dir.parent.name
    return OmegaConf.create(data)


def run_stage(stage_cfg: DictConfig, datamodule: Any, label: str) -> dict[str, Any]:
    """One link of the chain in its own run directory, started like any run (`rundir.begin_run`: the
    lock, no overwrite, the run record, the checkpoint); with `resume=auto` a finished link is read
    back instead of run again."""
    output_dir = Path(stage_cfg.paths.output_dir)
    summary_file = output_dir / "summary.json"
    if stage_cfg.resume == "auto" and summary_file.is_file():
        log.info("TAKD: %s finished earlier (%s): skipping", label, summary_file)
        return json.loads(summary_file.read_text())
    log.info("TAKD: running %s: %s -> %s", label, stage_cfg.teacher.name, stage_cfg.student.name)
    lock, checkpoint = begin_run(output_dir, stage_cfg.resume, OmegaConf.to_container(stage_cfg, resolve=True),
                                 allow_changes=bool(stage_cfg.get("resume_allow_changes", False)))
    try:
        return distill(stage_cfg, datamodule, ckpt_path=checkpoint)
    finally:
        if lock is not None:
            lock.release()


def run_chain(cfg: DictConfig, datamodule: Any, ckpt_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """`stage=takd`: run (or resume) the whole chain on one data module; returns the chain summary
    (empty on non-zero DDP ranks). `ckpt_path` is unused: each link resumes from its own directory."""
    if cfg.get("takd") is None:
        raise ValueError("stage=takd needs a `takd:` node (use experiment=takd)")
    if cfg.resume not in (None, "auto"):
        raise ValueError(f"stage=takd supports resume=auto (per stage) or null, got resume={cfg.resume!r}")
    if len(teacher_configs(cfg)) != 1:
        raise ValueError("stage=takd distils from one teacher; teacher=ensemble is not supported")
    output_dir = Path(cfg.paths.output_dir)
    members = chain_members(cfg, datamodule)
    teacher: dict[str, Any] = OmegaConf.to_container(cfg.teacher, resolve=True)  # type: ignore[assignment]
    stages: list[dict[str, Any]] = []
    for i, member in enumerate(members, 1):
        last = i == len(members)
        label = f"stage{i}_{member.name}"
        with exit_on_sigterm(f"TAKD stage {i} ({label})"):  # inside its fit, distill says what it saved
            summary = run_stage(stage_config(cfg, teacher, member, output_dir / label, cfg.baseline and last),
                                datamodule, label)
        if not summary:  # non-zero DDP rank
            return {}
        stages.append({"stage": label, "teacher": str(teacher["name"]),
                       "student": str(member.name), "output_dir": str(output_dir / label), "summary": summary})
        teacher = saved_student_teacher(str(member.name), summary["student_dir"], summary["task"])
    direct = None
    if cfg.takd.get("compare_direct"):
        label = f"direct_{cfg.student.name}"
        with exit_on_sigterm(f"TAKD {label}"):
            direct = run_stage(stage_config(cfg, cfg.teacher, members[-1], output_dir / label, False), datamodule, label)
    return write_chain_summary(cfg, output_dir, stages, direct)


def write_chain_summary(cfg: DictConfig, output_dir: Path, stages: list[dict[str, Any]],
                        direct: dict[str, Any] | None) -> dict[str, Any]:
    """Held-out rows of the teacher, every model of the chain (`<name> (stage i)`, whose agreement
    column is with that stage's own teacher), the last stage's CE-only baseline and the direct
    teacher -> student run; printed and written to <output_dir>/summary.json."""
    first, final = stages[0]["summary"], stages[-1]["summary"]
    rows = {key: value for key, value in first["models"].items() if key.startswith("teacher:")}
    for i, stage in enumerate(stages, 1):
        rows[f"{stage['student']} (stage {i})"] = stage["summary"]["models"]["student (KD)"]
    if "student (CE only)" in final["models"]:
        rows["student (CE only)"] = final["models"]["student (CE only)"]
    if direct:
        rows["student (direct KD)"] = direct["models"]["student (KD)"]
    summary = {"stage": "takd", "loss": str(cfg.loss.name), "seed": int(cfg.seed), "task": final["task"],
               "models": rows, "stages": [{k: v for k, v in s.items() if k != "summary"} for s in stages],
               "student_dir": final["student_dir"]}
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(rows, final["task"], final["student_dir"], title=f"kd-lightning TAKD: loss={cfg.loss.name}")
    return summary

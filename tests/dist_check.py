"""A few optimizer steps of a tiny KD run, recording each step's gradients and loss: the same global
batches on 1 process (optionally with accumulation) or on N processes (DDP, FSDP).

Run in-process with `run_steps(...)`, or as a script (Lightning re-launches it once per rank):
    python tests/dist_check.py OUT STRATEGY DEVICES BATCH_SIZE ACCUMULATE [chunk=N] [teacher=KIND] [callback=on_policy|sar] [rows=full] [vocab=N] [keep] [reference]
Rank 0 writes OUT/steps.pt: {"grads": [[tensor per student param] per step], "losses": [...],
"step_tokens": [...], "params": [final student params]}.

Or several configurations in one launch (one Python + Lightning start-up and one gloo group for all):
    python tests/dist_check.py --plan PLAN.json OUT
PLAN.json maps a name to [STRATEGY, DEVICES, BATCH_SIZE, ACCUMULATE, [EXTRAS...]]; they run in order, on
the same processes, and rank 0 writes OUT/NAME/steps.pt for each. A configuration that raises writes
OUT/NAME/error-rankR.txt (its traceback) and ends the launch: the ones after it have no steps.pt.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kd_lightning.data.base import BaseDataModule, DictDataset
from kd_lightning.losses import forward_kl
from kd_lightning.module import DistillationModule
from kd_lightning.tasks import IGNORE_INDEX

SEQ, SAMPLES, STEPS = 12, 24, 3
VOCAB = 40  # the tiny LMs' vocabulary (tests.helpers.V); "vocab=N" on the command line changes it


def varied_tokens(n: int = SAMPLES, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows whose counted tokens range from 1 to seq-1 (long prompts masked with -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    labels = ids.clone()
    for row in range(n):
        prompt = int(torch.randint(0, seq - 1, (1,), generator=g))
        labels[row, : prompt + 1] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def every_token_counted(n: int = SAMPLES, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """`varied_tokens` with every label counted: each process's batch holds as many tokens as any other."""
    rows = varied_tokens(n, seq)
    rows["labels"] = rows["input_ids"].clone()
    return rows


class TinyLMData(BaseDataModule):
    task = "causal_lm"

    def __init__(self, batch_size: int, rows: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(batch_size, None, 0, seed=7)
        self.rows = rows if rows is not None else varied_tokens()

    def _load(self) -> dict[str, DictDataset]:
        return {split: DictDataset(**self.rows) for split in ("train", "val", "test")}


class RecordSteps(L.Callback):
    """Each optimizer step's student gradients (after DDP's all-reduce) and summed returned loss."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []
        self.losses: list[float] = []
        self.step_tokens: list[int] = []
        self.pending = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # outputs["loss"] is the returned loss divided by accumulate_grad_batches (Lightning's closure)
        self.pending += float(outputs["loss"])

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        from kd_lightning.infra.sharding import full_tensor

        self.grads.append([full_tensor(p.grad).clone() for p in pl_module.student.parameters()])
        self.step_tokens.append(int(pl_module.trainer.callback_metrics.get("train/step_tokens", torch.tensor(-1))))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0 and batch_idx:
            self.flush(trainer)

    def flush(self, trainer: L.Trainer) -> None:
        total = torch.tensor(self.pending)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        # returned losses are step-token shares times world_size * accumulate: after Lightning's
        # division by accumulate, their sum over micro-batches and ranks is world_size * step mean
        self.losses.append(float(total) / trainer.world_size)
        self.pending = 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.flush(trainer)


def make_teacher(kind: str = "dense") -> torch.nn.Module:
    """"dense": a tiny Llama; "moe": a tiny Mixtral; "ka": it in `KnowledgeAugmentedMoE` (2 passes a step, sampling
    probability 0, so every pass routes greedily and the numbers are deterministic); "reuse=DIR": the
    dense teacher's outputs through a `teacher_outputs` store at DIR (float32)."""
    from tests.helpers import tiny_lm

    if kind in ("ka", "moe"):
        from tests.test_moe import tiny_moe
        from kd_lightning.teachers.moe import KnowledgeAugmentedMoE

        moe = tiny_moe("mixtral", layers=2)
        return moe if kind == "moe" else KnowledgeAugmentedMoE(moe, num_samples=2, sampling_prob=0.0, seed=0)
    teacher = tiny_lm(1, hidden=48, vocab=VOCAB)
    if kind.startswith("reuse="):
        from kd_lightning.teachers.teacher_outputs import MemoizedTeacher

        return MemoizedTeacher(teacher, reuse_store(kind.split("=", 1)[1]))
    return teacher


def reuse_store(directory: str) -> Any:
    from kd_lightning.teachers.encodings import Encoding
    from kd_lightning.teachers.store import TeacherOutputStore, store_identity
    identity = store_identity(weights="dist-check", model_config=None, precision="32-true", accelerator="cpu",
                              vocab_size=VOCAB, encoding=Encoding("full", "float32"))
    return TeacherOutputStore(directory, identity, flush_rows=4)


def plain_kl(*args: Any, **kwargs: Any) -> torch.Tensor:
    """forward KL under another name: no fused kernel knows it, so the module takes its reference path."""
    return forward_kl(*args, **kwargs)


def make_module(chunk_size: int | None = None, teacher: str = "dense", reference: bool = False) -> DistillationModule:
    from tests.helpers import tiny_lm

    loss = plain_kl if reference else forward_kl
    return DistillationModule(tiny_lm(0, vocab=VOCAB), make_teacher(teacher), loss, kd_weight=0.5, ce_weight=0.5,
                              optimizer=partial(torch.optim.SGD, lr=0.5), chunk_size=chunk_size,
                              teacher_combine="losses" if teacher == "ka" else "mixture")


def run_steps(strategy: Any = "auto", devices: int = 1, batch_size: int = 4, accumulate: int = 1,
              steps: int = STEPS, rows: dict[str, torch.Tensor] | None = None,
              chunk_size: int | None = None, teacher: str = "dense",
              callback: str | None = None, reference: bool = False) -> dict[str, Any]:
    torch.manual_seed(0)
    module, record = make_module(chunk_size, teacher, reference), RecordSteps()
    callbacks: list[L.Callback] = [record]
    if callback == "on_policy":  # every step on student samples; many EOS ids: rows (and ranks) end at different times
        from kd_lightning.callbacks.generation import OnPolicyGeneration

        module.student.generation_config.eos_token_id = list(range(3, 13))
        callbacks.append(OnPolicyGeneration(lambda_on_policy=1.0, max_new_tokens=6, prompt_length=4, seed=5))
    elif callback == "sar":  # a router step of the MoE teacher before every student step
        from kd_lightning.callbacks.sar import StudentAwareRouter

        # no balance term: its CV² of per-process expert importance is not a mean over tokens, so only
        # the KL part's gradient is the same on 1 process and on N with equal token counts
        callbacks.append(StudentAwareRouter(lr=0.05, balance_weight=0.0))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps,
                        accumulate_grad_batches=accumulate, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=TinyLMData(batch_size, rows), weights_only=True)
    from kd_lightning.infra.sharding import full_state_dict, is_sharded

    teacher = module.teachers["teacher"]
    store = getattr(teacher, "store", None)
    if store is not None:
        store.flush()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in teacher.parameters())
    teacher_fraction = local / sum(p.numel() for p in teacher.parameters())
    params = full_state_dict(module.student)
    return {"sharded": is_sharded(module.student), "teacher_fraction": teacher_fraction,"grads": record.grads, "losses": record.losses, "step_tokens": record.step_tokens,
            "params": params, "rank": trainer.global_rank}


def run_config(strategy: str, devices: int, batch_size: int, accumulate: int, extras: list[str]) -> dict[str, Any]:
    """One configuration as the command line names it: "chunk=N" (loss.chunk_size), "teacher=KIND" (see
    make_teacher), "callback=on_policy|sar", "rows=full" (every_token_counted), "vocab=N", "keep" (fsdp:
    student_reshard_after_forward=False), "reference" (a loss without a fused kernel: the reference
    chunked/dense path)."""
    global VOCAB
    VOCAB = next((int(e.split("=", 1)[1]) for e in extras if e.startswith("vocab=")), 40)
    chunk = next((int(e.split("=", 1)[1]) for e in extras if e.startswith("chunk=")), None)
    kind = next((e.split("=", 1)[1] for e in extras if e.startswith("teacher=")), "dense")
    callback = next((e.split("=", 1)[1] for e in extras if e.startswith("callback=")), None)
    rows = every_token_counted() if "rows=full" in extras else None
    chosen: Any = strategy
    if strategy == "fsdp":  # "keep": student blocks stay gathered from forward to backward
        from kd_lightning.infra.sharding import ShardedDataParallel

        chosen = ShardedDataParallel(student_reshard_after_forward="keep" not in extras)
    return run_steps(chosen, devices, batch_size, accumulate, chunk_size=chunk, teacher=kind, callback=callback,
                     rows=rows, reference="reference" in extras)


def save(result: dict[str, Any], out: str) -> None:
    if result["rank"] == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(result, os.path.join(out, "steps.pt"))


def run_plan(plan_file: str, out: str) -> None:
    import json
    import traceback

    plan = json.loads(Path(plan_file).read_text())
    for name, (strategy, devices, batch_size, accumulate, extras) in plan.items():
        try:
            result = run_config(strategy, int(devices), int(batch_size), int(accumulate), list(extras))
        except BaseException:
            where = Path(out) / name
            where.mkdir(parents=True, exist_ok=True)
            rank = os.environ.get("LOCAL_RANK", "0")
            (where / f"error-rank{rank}.txt").write_text(traceback.format_exc())
            raise
        save(result, os.path.join(out, name))


def fill_rank0_share(directory: str) -> int:
    """Store the dense teacher's outputs for rank 0's share of epoch 0 (of 2 processes) at `directory`,
    so that in a 2-process run with teacher=reuse=DIR rank 0 reads every step and rank 1 computes;
    returns the number of rows stored."""
    from kd_lightning.data.base import DictDataset
    from kd_lightning.data.resumable import EpochSeededSampler

    rows = varied_tokens()
    mine = list(EpochSeededSampler(DictDataset(**rows), seed=7, num_replicas=2, rank=0))  # in order
    fill = make_teacher(f"reuse={directory}")
    fill(input_ids=rows["input_ids"][mine], attention_mask=rows["attention_mask"][mine])
    fill.store.flush()
    return len(mine)


class PlanRuns:
    """The results of one `--plan` launch (relaunched after a configuration that fails, so each
    configuration's result or error is its own)."""

    def __init__(self, out: Path, errors: dict[str, str]) -> None:
        self.out, self.errors = out, errors

    def __getitem__(self, name: str) -> dict[str, Any]:
        assert name not in self.errors, f"the 2-process run {name!r} failed:\n{self.errors[name]}"
        return torch.load(self.out / name / "steps.pt", weights_only=False)


def launch_plan(plan: dict[str, list[Any]], out: Path, timeout: int = 600) -> PlanRuns:
    """Run `plan` (see the module docstring) in one 2-process launch of this script; should a
    configuration fail (or hang past `timeout`), note its error and launch the ones after it again."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)  # Lightning starts the other process itself
    errors: dict[str, str] = {}
    remaining = dict(plan)
    while remaining:
        out.mkdir(parents=True, exist_ok=True)
        plan_file = out / "plan.json"
        plan_file.write_text(json.dumps(remaining))
        try:
            proc = subprocess.run([sys.executable, __file__, "--plan", str(plan_file), str(out)], cwd=out, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            log = proc.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            log = f"the launch timed out after {timeout} s; its stderr ends:\n{str(e.stderr or '')[-3000:]}"
        unfinished = [name for name in remaining if not (out / name / "steps.pt").exists()]
        if not unfinished:
            break
        failed = unfinished[0]
        traces = "\n".join(f.read_text() for f in sorted((out / failed).glob("error-rank*.txt")))
        errors[failed] = f"{traces}\n--- the launch's stderr ---\n{log}"
        remaining = {name: plan[name] for name in unfinished[1:]}
    return PlanRuns(out, errors)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--plan":
        run_plan(sys.argv[2], sys.argv[3])
    else:
        out, strategy, devices, batch_size, accumulate = sys.argv[1:6]
        save(run_config(strategy, int(devices), int(batch_size), int(accumulate), sys.argv[6:]), out)

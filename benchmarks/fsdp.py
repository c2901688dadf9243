"""1 process vs DDP on 2 vs FSDP on 2: per-process model-state memory, peak resident memory, tokens/s.

A KD training step (forward KL, 0.5 KD + 0.5 CE, AdamW) with a 57M-parameter Llama-style teacher
(hidden 768, 8 layers) and an 8.6M-parameter student (hidden 256, 8 layers), byte vocabulary (259),
batch 4 x 128 tokens per process, random ids (only cost matters), one torch thread per process.
`strategy=fsdp` shards student and frozen teacher per block (kd_lightning/infra/sharding.py);
`fsdp-keep` is the same with `student_reshard_after_forward=false` (student blocks stay gathered
from forward to backward); `fsdp-ckpt` (with `--checkpointing`) with
`student_activation_checkpointing=true`; DDP replicates both.

Per process it reports:
- model state: bytes of the parameters (student + teacher), gradients and AdamW state this process
  holds (the local shard of a DTensor), counted from the tensors after the last step;
- peak RSS: the kernel's resident high-water mark (VmHWM) of the process (includes Python, torch,
  activations and FSDP's gathered blocks during a step);
- tokens/s over all processes, timed after `--warmup` steps.

    python benchmarks/fsdp.py --steps 6 --warmup 2     # about 5 minutes on 2 CPU cores
    python benchmarks/fsdp.py --accelerator cuda --devices 8 --teacher-hidden 2048 --teacher-layers 16 \
        --vocab 128000 --mixed-precision bf16             # what benchmarks/gpu_check.sh runs

On CUDA, memory is torch.cuda.max_memory_allocated (peak) instead of VmHWM.

`--real-teacher DIR` measures instead what a user's run costs: `train.py` itself with a
`from_pretrained` teacher (e.g. SmolLM2-135M, `python -m kd_lightning.teachers.packaged` prints its
directory), `student=tiny`, `dataset=text_files` on DIR's tokenizer over `--corpus`, seq_len 128,
batch 2 per process (4 for the one process: the same global batch), 2 steps, the summary included;
each process writes its VmHWM at exit. The held-out student loss of DDP and FSDP must agree to 1e-5.

    python benchmarks/fsdp.py --real-teacher "$(python -m kd_lightning.teachers.packaged)" --corpus DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH = 128, 4


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def local_bytes(tensor: Any) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(strategy_name: str, devices: int, args: argparse.Namespace, out: Path) -> None:
    import lightning as L
    import torch
    from transformers import LlamaConfig

    from kd_lightning.data.base import BaseDataModule, DictDataset
    from kd_lightning.losses import forward_kl
    from kd_lightning.models import build_causal_lm
    from kd_lightning.module import DistillationModule
    from kd_lightning.infra.sharding import ShardedDataParallel

    torch.set_num_threads(1)
    steps, warmup, VOCAB = args.steps, args.warmup, args.vocab

    def llama(hidden: int, layers: int, seed: int) -> torch.nn.Module:
        config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                             max_position_embeddings=SEQ)
        return build_causal_lm(config, vocab_size=VOCAB, seed=seed)

    class RandomBytes(BaseDataModule):
        task = "causal_lm"

        def _load(self) -> dict[str, DictDataset]:
            ids = torch.randint(3, VOCAB, (BATCH * devices * (steps + 1), SEQ), generator=torch.Generator().manual_seed(0))
            rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            return {split: DictDataset(**rows) for split in ("train", "val", "test")}

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.start = 0.0
            self.seconds = 0.0

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

        def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
            self.seconds = time.perf_counter() - self.start

    teacher = llama(args.teacher_hidden, args.teacher_layers, seed=1)
    student = llama(args.student_hidden, args.student_layers, seed=0)
    counts = {"teacher_params": sum(p.numel() for p in teacher.parameters()),
              "student_params": sum(p.numel() for p in student.parameters())}
    module = DistillationModule(student, teacher, forward_kl, kd_weight=0.5, ce_weight=0.5)
    clock = Clock()
    sharded = strategy_name.startswith("fsdp")
    strategy: Any = (ShardedDataParallel(mixed_precision=args.mixed_precision,
                                         student_reshard_after_forward=strategy_name != "fsdp-keep",
                                         student_activation_checkpointing=strategy_name == "fsdp-ckpt")
                     if sharded else ("ddp" if devices > 1 else "auto"))
    precision = "bf16-mixed" if args.mixed_precision == "bf16" and not sharded else "32-true"
    trainer = L.Trainer(accelerator=args.accelerator, devices=devices, strategy=strategy, max_steps=steps,
                        precision=precision, callbacks=[clock],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=RandomBytes(BATCH, None, 0, seed=0))
    optimizer = trainer.optimizers[0]
    teacher_mib = sum(local_bytes(p) for p in module.teachers.parameters()) / 2**20
    state = {
        "params": sum(local_bytes(p) for p in module.parameters()),  # student and teachers
        "grads": sum(local_bytes(p.grad) for p in module.student.parameters() if p.grad is not None),
        "optimizer": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }
    row = {"strategy": strategy_name, "processes": devices, "rank": trainer.global_rank, **counts,
           "model_state_mib": sum(state.values()) / 2**20, "teacher_params_mib": teacher_mib, **{f"{k}_mib": v / 2**20 for k, v in state.items()},
           "peak_rss_mib": torch.cuda.max_memory_allocated() / 2**20 if args.accelerator == "cuda" else vm_hwm_mib(),
           "tokens_per_second": devices * BATCH * SEQ * (steps - warmup) / clock.seconds}
    (out / f"{strategy_name}{devices}-rank{trainer.global_rank}.json").write_text(json.dumps(row))


TRAIN_OUT = "KD_FSDP_BENCH_OUT"  # set: this process is a train.py run (or a rank Lightning launched of it)


def train_worker() -> None:
    """`train.py` with the command line's overrides; at exit this process's peak RSS goes to the
    out directory. Lightning re-launches this same script for rank 1, which inherits the variable."""
    import atexit

    from kd_lightning.run.cli import main as train_main

    out, rank = Path(os.environ[TRAIN_OUT]), int(os.environ.get("LOCAL_RANK", 0))
    atexit.register(lambda: (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": vm_hwm_mib()})))
    train_main()


def real_teacher(args: argparse.Namespace, out: Path) -> None:
    """1 process, DDP and FSDP runs of train.py on the real teacher: peak RSS of every process."""
    directory = Path(args.real_teacher).resolve()
    common = ["teacher=hf", f"teacher.model.pretrained={directory}", "student=tiny", "dataset=text_files",
              f"dataset.paths=[{Path(args.corpus).resolve()}]", f"dataset.tokenizer={directory}", "dataset.seq_len=128",
              f"dataset.test_fraction={args.test_fraction}", "dataset.val_fraction=0.02", f"trainer.max_steps={args.steps}",
              "baseline=false", f"paths.cache_dir={out / 'cache'}", "trainer.enable_progress_bar=false",
              *args.overrides]
    rows = {}
    for name, strategy, batch in (("single", "cpu", 4), ("ddp", "ddp", 2), ("fsdp", "fsdp", 2)):
        if name not in args.runs.split(","):
            continue
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", TRAIN_OUT: str(run),
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, str(Path(__file__).resolve()), f"strategy={strategy}", f"dataset.batch_size={batch}",
               f"hydra.run.dir={run / 'hydra'}", *common]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        peaks = [json.loads(f.read_text())["peak_rss_mib"] for f in sorted(run.glob("rank*.json"))]
        loss = json.loads((run / "hydra" / "summary.json").read_text())["models"]["student (KD)"]["loss"]
        rows[name] = {"peaks_mib": peaks, "student_loss": loss, "wall_s": time.perf_counter() - started}
        print(f"{name}: done", flush=True)
    ddp = max(rows["ddp"]["peaks_mib"]) if "ddp" in rows else float("nan")
    print(f"\nteacher {directory.name}, student=tiny, seq_len 128, global batch 4, {args.steps} steps + summary\n")
    print("| run | peak RSS per process MiB | largest vs DDP | held-out student loss | wall s |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        peaks = " / ".join(f"{p:.0f}" for p in row["peaks_mib"])
        print(f"| {name} | {peaks} | {max(row['peaks_mib']) / ddp:.2f}x | {row['student_loss']:.6f} | {row['wall_s']:.0f} |")
    if "ddp" in rows and "fsdp" in rows:
        gap = abs(rows["fsdp"]["student_loss"] - rows["ddp"]["student_loss"])
        print(f"\n|loss(FSDP) - loss(DDP)| = {gap:.2e} ({'<=' if gap <= 1e-5 else '>'} 1e-5)")
    (out / "fsdp_real.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    if TRAIN_OUT in os.environ:
        train_worker()
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--devices", type=int, default=2, help="processes of the DDP and FSDP runs")
    p.add_argument("--teacher-hidden", type=int, default=768)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=259, help="vocabulary (259: the byte tokenizer)")
    p.add_argument("--mixed-precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: FSDP bf16 params + fp32 reduce; bf16-mixed autocast for 1 process and DDP")
    p.add_argument("--checkpointing", action="store_true",
                   help="also fsdp-ckpt: FSDP with student_activation_checkpointing=true")
    p.add_argument("--real-teacher", default=None, metavar="DIR", help="train.py runs with this from_pretrained teacher")
    p.add_argument("--corpus", default=None, help="--real-teacher: a directory of .txt files (dataset=text_files)")
    p.add_argument("--runs", default="single,ddp,fsdp", help="--real-teacher: which of single,ddp,fsdp to run")
    p.add_argument("--test-fraction", type=float, default=0.02, help="--real-teacher: the held-out share the summary scores")
    p.add_argument("overrides", nargs="*", help="--real-teacher: further train.py overrides for every run")
    p.add_argument("--worker", nargs=2, metavar=("STRATEGY", "DEVICES"), help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kd_fsdp-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.real_teacher:
        if not args.corpus:
            p.error("--real-teacher needs --corpus DIR (.txt files)")
        real_teacher(args, out)
        return
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args, out)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
              if k not in ("worker", "out", "devices", "real_teacher", "corpus", "test_fraction", "overrides", "runs",
                           "checkpointing")]
    runs = [("single", 1), ("ddp", args.devices), ("fsdp", args.devices), ("fsdp-keep", args.devices)]
    if args.checkpointing:
        runs.append(("fsdp-ckpt", args.devices))
    for name, devices in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--out", str(out), "--worker", name, str(devices)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} x{devices} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads((out / f"{name}{devices}-rank{r}.json").read_text()) for r in range(devices)]
        rows.append(max(ranks, key=lambda r: r["peak_rss_mib"]))  # the largest process
        print(f"{name} x{devices}: done", flush=True)
    ddp = rows[1]
    print(f"\nteacher {rows[0]['teacher_params']:,} params, student {rows[0]['student_params']:,}; "
          f"{args.steps} steps ({args.warmup} warm-up), batch {BATCH} x {SEQ} per process, 1 thread per process\n")
    peak = "peak CUDA MiB" if args.accelerator == "cuda" else "peak RSS MiB"
    print(f"| run | model state per process MiB (params / grads / AdamW) | vs DDP | {peak} (largest process) | tokens/s | vs DDP |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} x{r['processes']} | {r['model_state_mib']:.0f} ({r['params_mib']:.0f} / {r['grads_mib']:.0f} / "
              f"{r['optimizer_mib']:.0f}) | {r['model_state_mib'] / ddp['model_state_mib']:.2f}x | {r['peak_rss_mib']:.0f} | "
              f"{r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / ddp['tokens_per_second']:.2f}x |")
    (out / "fsdp.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

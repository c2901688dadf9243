"""`kd-report <multirun dir>`: the runs of a Hydra multirun as one table, mean ± std per method, a plot.

Every job directory of a sweep (`python train.py -m ...`) holds `.hydra/overrides.yaml`,
`.hydra/config.yaml`, `summary.json` (held-out metrics written by `kd_lightning.run.distill.distill`) and
`csv/metrics.csv` (the CSV logger); a TAKD chain (`stage=takd`) reports its last stage and
sums the fit time of its stages. A run's *method* is the set of command-line overrides that differ
across the runs, seed left out (e.g. `loss=skew_kl`), so the same code reports any sweep preset.

Writes into the multirun directory (or `--out`): `results.md` (per-run table and per-method
mean ± sample std over seeds), `results.csv` (one row per run), `results_by_method.csv` and
`val_loss.png` (validation loss per method, mean over seeds, shaded ± std).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEED_KEYS = ("seed", "+seed", "++seed")
# (key in a row, markdown header, number format); one row per run, held-out metrics of the student.
COLUMNS: list[tuple[str, str, str]] = [
    ("loss", "held-out loss", ".4f"),
    ("ppl", "perplexity", ".3f"),
    ("teacher_agreement", "teacher agreement", ".3f"),
    ("ece", "ECE (15-bin)", ".4f"),
    ("baseline_loss", "CE-only loss", ".4f"),
    ("wall_seconds", "wall time (s)", ".1f"),
    ("tokens_per_second", "tokens/s", ",.0f"),
]


class ReportError(Exception):
    """A multirun directory that cannot be reported on (the message says why)."""


@dataclass
class Run:
    path: Path
    overrides: list[str]
    summary: dict[str, Any]
    seed: int | None
    method: str = ""
    values: dict[str, float | None] = field(default_factory=dict)


def job_dirs(root: Path) -> list[Path]:
    """Hydra job directories under `root` (any depth: launchers may nest), in job order (10 after 9)."""
    found = [p.parent.parent for p in root.rglob(".hydra/overrides.yaml")]
    return sorted(found, key=lambda p: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.relative_to(root).parts])


def load_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """(finished runs, job directories without a summary.json)."""
    if not root.exists():
        raise ReportError(f"{root} does not exist")
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory (pass the multirun directory, hydra.sweep.dir)")
    dirs = job_dirs(root)
    if not dirs:
        raise ReportError(f"no Hydra job directories (with .hydra/overrides.yaml) under {root}; "
                          "pass the multirun directory of a `python train.py -m ...` sweep")
    runs, unfinished = [], []
    for job in dirs:
        if not (job / "summary.json").is_file():
            unfinished.append(job)
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text()) if (job / ".hydra" / "config.yaml").is_file() else {}
        summary = json.loads((job / "summary.json").read_text())
        seed = summary.get("seed", (config or {}).get("seed"))
        runs.append(Run(job, [str(o) for o in overrides], summary, seed if isinstance(seed, int) else None))
    if not runs:
        listed = ", ".join(str(p.relative_to(root)) for p in unfinished[:5]) + (" ..." if len(unfinished) > 5 else "")
        raise ReportError(f"no finished runs under {root}: {len(unfinished)} job director"
                          f"{'y has' if len(unfinished) == 1 else 'ies have'} no summary.json ({listed}); "
                          "they failed or are still running (see their cli.log)")
    for run, name in zip(runs, method_names([r.overrides for r in runs], [r.summary for r in runs])):
        run.method = name
        run.values = run_values(run.summary, run.path)
    return runs, unfinished


def split_override(override: str) -> tuple[str, str]:
    """`key=value` -> (key, value); long floats (Optuna trials) shortened to 4 significant digits."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return key, value
    return key, value if number.is_integer() or len(value) <= 6 else f"{number:.4g}"


def method_names(overrides: Sequence[Sequence[str]], summaries: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """Name each run by the overrides that differ across runs (seed excluded), in command-line order.

    A key set in some runs and absent in others counts as differing. When nothing but the seed
    differs, every run is named after its loss (`loss=<name>`)."""
    parsed = [dict(split_override(o) for o in run) for run in overrides]
    keys: list[str] = []
    for run in parsed:
        keys += [k for k in run if k not in keys and k not in SEED_KEYS]
    varying = [k for k in keys if len({run.get(k) for run in parsed}) > 1]
    names = [" ".join(f"{k}={run[k]}" for k in varying if k in run) for run in parsed]
    if summaries is not None:
        names = [name or f"loss={s.get('loss', '?')}" for name, s in zip(names, summaries)]
    return [name or "default" for name in names]


def stage_dirs(summary: dict[str, Any], job: Path) -> list[Path]:
    """Directories of the runs that make up a job: the job itself, or for a TAKD chain
    (`stage=takd`) its stage directories in chain order (found inside the job, so a moved
    multirun directory still works)."""
    return [job / Path(stage["output_dir"]).name for stage in summary["stages"]] if summary.get("stages") else [job]


def student_metrics(summary: dict[str, Any], where: Path) -> dict[str, Any]:
    """The distilled student's row: `student (KD)`, or a TAKD chain's last stage `<name> (stage n)`
    (whose teacher agreement is with the last assistant)."""
    models, stages = summary.get("models", {}), summary.get("stages")
    key = f"{stages[-1]['student']} (stage {len(stages)})" if stages else "student (KD)"
    if key not in models:
        raise ReportError(f"{where}/summary.json has no row {key!r} (rows: {sorted(models)})")
    return models[key]


def fit_timing(summary: dict[str, Any], job: Path) -> tuple[float | None, float | None]:
    """(seconds, tokens/s) of `Trainer.fit`, summed over the stages of a TAKD chain."""
    timings = [summary.get("timing")] if not summary.get("stages") else [
        json.loads(p.read_text()).get("timing") if (p := d / "summary.json").is_file() else None
        for d in stage_dirs(summary, job)]
    if not timings or any(t is None for t in timings):
        return None, None
    seconds = sum(float(t["fit_seconds"]) for t in timings)
    tokens = sum(float(t["tokens_per_second"]) * float(t["fit_seconds"]) for t in timings)
    return seconds, tokens / seconds if seconds > 0 else None


def run_values(summary: dict[str, Any], job: Path) -> dict[str, float | None]:
    """The numbers of one run; a metric its summary.json lacks is None."""
    student = student_metrics(summary, job)
    baseline = summary.get("models", {}).get("student (CE only)", {})
    seconds, tokens_per_second = fit_timing(summary, job)
    raw = {"loss": student.get("loss"), "ppl": student.get("ppl"), "teacher_agreement": student.get("teacher_agreement"),
           "ece": student.get("ece"), "baseline_loss": baseline.get("loss"),
           "wall_seconds": seconds, "tokens_per_second": tokens_per_second}
    return {k: None if v is None else float(v) for k, v in raw.items()}


def reuse_stats(run: Run) -> dict[str, float] | None:
    """`teacher_outputs` statistics of a run (summed over a TAKD chain's stages), or None."""
    summaries = [run.summary] if not run.summary.get("stages") else [
        json.loads(p.read_text()) if (p := d / "summary.json").is_file() else {} for d in stage_dirs(run.summary, run.path)]
    found = [s["teacher_outputs"] for s in summaries if s.get("teacher_outputs")]
    if not found:
        return None
    keys = ("hit_rows", "computed_rows", "computed_seconds", "saved_seconds", "lookup_seconds")
    return {k: sum(float(f.get(k, 0)) for f in found) for k in keys}


def reuse_section(runs: Sequence[Run]) -> list[str]:
    """Markdown lines on teacher outputs read from the shared store (`teacher_outputs.reuse`)."""
    stats = [(r, st) for r in runs if (st := reuse_stats(r)) is not None]
    if not stats:
        return []
    total = {k: sum(st[k] for _, st in stats) for k in stats[0][1]}
    readers = sum(1 for _, st in stats if st["hit_rows"] > 0)
    fit = sum(r.values["wall_seconds"] or 0.0 for r in runs)
    net = total["saved_seconds"] - total["lookup_seconds"]
    rows = total["hit_rows"] + total["computed_rows"]
    line = (f"{len(stats)} of {len(runs)} run(s) reused teacher outputs (`teacher_outputs.reuse`): the teacher ran on "
            f"{total['computed_rows']:,.0f} rows ({total['computed_seconds']:.1f} s) and {total['hit_rows']:,.0f} of "
            f"{rows:,.0f} rows ({(total['hit_rows'] / rows if rows else 0):.0%}) were read from the store by {readers} "
            f"run(s). **Teacher time saved: about {total['saved_seconds']:.1f} s** (the stored rows' measured teacher "
            f"time), reading cost {total['lookup_seconds']:.1f} s, net {net:.1f} s")
    if fit > 0:
        line += f" (for scale: the runs spent {fit:.1f} s in `Trainer.fit`; the saving also covers test-split evaluation)"
    return ["", "## Teacher outputs", "", line + "."]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; nan for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One entry per method: seeds, n and (mean, std) per metric; sorted by mean held-out loss."""
    methods: dict[str, list[Run]] = {}
    for run in runs:
        methods.setdefault(run.method, []).append(run)
    rows = []
    for method, group in methods.items():
        row: dict[str, Any] = {"method": method, "n": len(group), "seeds": sorted(r.seed for r in group if r.seed is not None)}
        for key, _, _ in COLUMNS:
            row[key] = mean_std([r.values[key] for r in group if r.values.get(key) is not None])
        rows.append(row)
    return sorted(rows, key=lambda r: (math.isnan(r["loss"][0]), r["loss"][0]))


def present_columns(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    return [c for c in COLUMNS if any(r.values.get(c[0]) is not None for r in runs)]


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def started_without_baseline(run: Run) -> bool:
    """The job's recorded config (`.hydra/config.yaml`, else its `baseline=false` override) turned the
    CE-only baseline off."""
    config_path = run.path / ".hydra" / "config.yaml"
    if config_path.is_file():
        config = yaml.safe_load(config_path.read_text()) or {}
        if isinstance(config, dict) and "baseline" in config:
            return config["baseline"] is False
    return any(split_override(o) == ("baseline", "false") for o in run.overrides)


def not_asked_for(header: str, runs: Sequence[Run]) -> bool:
    """A column missing because the runs did not ask for it (not because kd-lightning was older):
    the CE-only loss of runs started with `baseline=false`."""
    return header == "CE-only loss" and all(started_without_baseline(r) for r in runs)


def render_markdown(root: Path, runs: Sequence[Run], unfinished: Sequence[Path]) -> str:
    columns = present_columns(runs)
    missing = [c[1] for c in COLUMNS if c not in columns]
    by_method = aggregate(runs)
    header = ["method", "seeds"] + [h for _, h, _ in columns]
    summary_rows = [[f"`{r['method']}`", ",".join(map(str, r["seeds"])) or str(r["n"])]
                    + [fmt(r[k][0], s) + ("" if math.isnan(r[k][1]) else " ± " + fmt(r[k][1], s)) for k, _, s in columns]
                    for r in by_method]
    run_rows = [[f"`{r.method}`", "–" if r.seed is None else str(r.seed)] + [fmt(r.values.get(k), s) for k, _, s in columns]
                + [str(r.path.relative_to(root))] for r in runs]
    parts = [f"# Results: {root}", "",
             f"{len(runs)} finished run(s), {len(by_method)} method(s). Student metrics on the held-out test split; "
             "mean ± sample std (n - 1) over seeds, best held-out loss first.", "",
             markdown_table(header, summary_rows), "", "## Runs", "",
             markdown_table(["method", "seed"] + [h for _, h, _ in columns] + ["directory"], run_rows)]
    not_asked = [header for header in missing if not_asked_for(header, runs)]
    if not_asked:
        parts += ["", f"Not computed: {', '.join(not_asked)} (every run was started with baseline=false)."]
    missing = [header for header in missing if header not in not_asked]
    if missing:
        parts += ["", f"Not in these summaries (older kd-lightning): {', '.join(missing)}."]
    if unfinished:
        parts += ["", f"Skipped {len(unfinished)} unfinished job(s) (no summary.json): "
                  + ", ".join(str(p.relative_to(root)) for p in unfinished)]
    parts += reuse_section(runs)
    optuna = root / "optimization_results.yaml"
    if optuna.is_file():
        parts += ["", "## Optuna", "", "```yaml", optuna.read_text().strip(), "```"]
    return "\n".join(parts) + "\n"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def val_curves(run: Run) -> dict[int, float]:
    """step -> val/student_loss from the CSV metrics of the run (of a chain's last stage); empty
    if there are none."""
    path = stage_dirs(run.summary, run.path)[-1] / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {int(row["step"]): float(row["val/student_loss"]) for row in csv.DictReader(f)
                if row.get("val/student_loss") not in (None, "")}


def plot_val_loss(runs: Sequence[Run], path: Path) -> bool:
    """Validation loss per method (mean over seeds, ± std shaded); False if no run logged any."""
    curves: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for step, value in val_curves(run).items():
            curves.setdefault(run.method, {}).setdefault(step, []).append(value)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_step in curves.items():
        steps = sorted(by_step)
        stats = [mean_std(by_step[s]) for s in steps]
        means = [m for m, _ in stats]
        (line,) = ax.plot(steps, means, marker="o", markersize=3, label=method)
        if any(not math.isnan(s) for _, s in stats):
            std = [0.0 if math.isnan(s) else s for _, s in stats]
            ax.fill_between(steps, [m - s for m, s in zip(means, std)], [m + s for m, s in zip(means, std)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("val/student_loss (nats/token)")
    ax.set_title("Validation loss, mean over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(root: Path | str, out: Path | str | None = None, plot: bool = True) -> str:
    """Collect the runs under `root`, write results.md/.csv (+ val_loss.png) into `out` (default
    `root`) and return the markdown."""
    root = Path(root).expanduser().resolve()
    runs, unfinished = load_runs(root)
    out = Path(out).expanduser() if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    keys = [k for k, _, _ in COLUMNS]
    write_csv(out / "results.csv", ["method", "seed", *keys, "directory"],
              [[r.method, r.seed, *("" if r.values.get(k) is None else r.values[k] for k in keys), str(r.path)] for r in runs])
    by_method = aggregate(runs)
    write_csv(out / "results_by_method.csv", ["method", "n", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))],
              [[r["method"], r["n"], *("" if math.isnan(v) else v for k in keys for v in r[k])] for r in by_method])
    text = render_markdown(root, runs, unfinished)
    if plot and plot_val_loss(runs, out / "val_loss.png"):
        text += "\n![validation loss](val_loss.png)\n"
    (out / "results.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kd-report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun directory (hydra.sweep.dir), e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("--out", default=None, help="where to write results.md/.csv and val_loss.png (default: multirun_dir)")
    parser.add_argument("--no-plot", action="store_true", help="skip val_loss.png")
    args = parser.parse_args(argv)
    try:
        text = write_report(args.multirun_dir, args.out, plot=not args.no_plot)
    except ReportError as err:
        parser.exit(2, f"kd-report: error: {err}\n")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()

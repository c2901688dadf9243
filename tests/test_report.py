"""`kd_lightning.report` on synthetic multirun directories (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from kd_lightning.report import ReportError, main, mean_std, method_names, write_report

CONSTANT = ["+sweep=losses", "trainer.max_steps=6"]


def make_job(root: Path, num: int, overrides: list[str], seed: int, loss: float, *, finished: bool = True,
             extra: dict | None = None, val: list[float] | None = None) -> Path:
    """A Hydra job directory as `python train.py -m` leaves it."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "paths": {"output_dir": "${hydra:x}"}}))
    if not finished:
        return job
    student = {"loss": loss, "ppl": math.exp(loss), "accuracy": 0.5, "teacher_agreement": 0.8, **(extra or {})}
    summary = {"loss": "kl", "seed": seed, "task": "causal_lm",
               "models": {"teacher:moe": {"loss": 1.0, "ppl": math.e}, "student (KD)": student,
                          "student (CE only)": {"loss": loss + 1.0, "ppl": 1.0}},
               "timing": {"fit_seconds": 10.0 + seed, "tokens_per_second": 1000.0}}
    (job / "summary.json").write_text(json.dumps(summary))
    (job / "csv").mkdir()
    with open(job / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/student_loss"])
        for step, value in enumerate(val or [loss + 1.0, loss]):
            writer.writerow([0, step, 1.0, ""])
            writer.writerow([0, step, "", value])
    return job


def two_methods_three_seeds(root: Path) -> None:
    """kl: losses 1, 2, 3 (mean 2, sample std 1); tvd: 4, 4, 4 (std 0); job dirs in sweep order."""
    num = 0
    for loss_name, losses in [("kl", [1.0, 2.0, 3.0]), ("tvd", [4.0, 4.0, 4.0])]:
        for seed, value in enumerate(losses):
            make_job(root, num, [f"loss={loss_name}", f"seed={seed}", *CONSTANT], seed, value)
            num += 1


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mean_and_sample_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = mean_std([5.0])
    assert mean == 5.0 and math.isnan(std)


def test_method_names_use_the_differing_overrides_without_seed() -> None:
    runs = [["loss=kl", "seed=0", "+sweep=losses"], ["loss=kl", "seed=1", "+sweep=losses"],
            ["loss=js", "seed=0", "+sweep=losses", "callbacks=[sar]"]]
    assert method_names(runs) == ["loss=kl", "loss=kl", "loss=js callbacks=[sar]"]
    grid = [["temperature=dts", "temperature.initial=1.0", "seed=0"], ["temperature=constant", "temperature.initial=1.0", "seed=0"],
            ["temperature=dts", "temperature.initial=4.0", "seed=2"]]
    assert method_names(grid) == ["temperature=dts temperature.initial=1.0", "temperature=constant temperature.initial=1.0",
                                  "temperature=dts temperature.initial=4.0"]


def test_method_names_fall_back_to_the_loss_and_shorten_trial_floats() -> None:
    assert method_names([["seed=0"], ["seed=1"]], [{"loss": "kl"}, {"loss": "kl"}]) == ["loss=kl", "loss=kl"]
    assert method_names([["seed=0"]]) == ["default"]
    trials = [["optimizer.lr=0.0012296071107", "seed=0"], ["optimizer.lr=0.006074996073", "seed=0"]]
    assert method_names(trials) == ["optimizer.lr=0.00123", "optimizer.lr=0.006075"]


def test_report_tables_csv_and_plot(tmp_path: Path) -> None:
    two_methods_three_seeds(tmp_path)
    make_job(tmp_path, 6, ["loss=js", "seed=0", *CONSTANT], 0, 0.0, finished=False)
    text = write_report(tmp_path)

    assert "| `loss=kl` | 0,1,2 | 2.0000 ± 1.0000 |" in text
    assert "| `loss=tvd` | 0,1,2 | 4.0000 ± 0.0000 |" in text
    assert text.index("`loss=kl` | 0,1,2") < text.index("`loss=tvd` | 0,1,2")  # best held-out loss first
    assert "Skipped 1 unfinished job(s) (no summary.json): 6" in text
    assert "CE-only loss" in text and "tokens/s" in text and "ECE" not in text.split("## Runs")[0]
    assert "Not in these summaries (older kd-lightning): ECE (15-bin)." in text
    assert (tmp_path / "results.md").read_text() == text

    rows = read_csv(tmp_path / "results.csv")
    assert [(r["method"], r["seed"], float(r["loss"])) for r in rows][:3] == [("loss=kl", "0", 1.0), ("loss=kl", "1", 2.0),
                                                                                ("loss=kl", "2", 3.0)]
    assert len(rows) == 6 and rows[0]["ece"] == "" and float(rows[2]["wall_seconds"]) == 12.0
    by_method = {r["method"]: r for r in read_csv(tmp_path / "results_by_method.csv")}
    assert float(by_method["loss=kl"]["loss_mean"]) == 2.0 and float(by_method["loss=kl"]["loss_std"]) == 1.0
    assert float(by_method["loss=tvd"]["baseline_loss_mean"]) == 5.0 and by_method["loss=tvd"]["n"] == "3"
    assert (tmp_path / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optional_metrics_and_numeric_job_order(tmp_path: Path) -> None:
    for num in range(11):  # job 10 sorts after job 9, not after job 1
        make_job(tmp_path, num, [f"distill.kd_weight={num}", "seed=0"], 0, float(num), extra={"ece": 0.01 * num})
    text = write_report(tmp_path, out=tmp_path / "report", plot=False)
    rows = read_csv(tmp_path / "report" / "results.csv")
    assert [r["method"] for r in rows] == [f"distill.kd_weight={n}" for n in range(11)]
    assert float(rows[10]["ece"]) == pytest.approx(0.1) and "ECE (15-bin)" in text and "Not in these" not in text
    assert not (tmp_path / "report" / "val_loss.png").exists()


def test_takd_chain_reports_its_last_stage_and_sums_stage_times(tmp_path: Path) -> None:
    for num, (assistants, loss) in enumerate([(0, 3.0), (1, 2.0)]):
        job = make_job(tmp_path, num, [f"takd.num_assistants={assistants}", "seed=0"], 0, 9.0)
        names = [f"ta{i + 1}" for i in range(assistants)] + ["tiny"]
        stages = [{"student": name, "output_dir": f"/moved/{num}/stage{i + 1}_{name}"} for i, name in enumerate(names)]
        models = {"teacher:moe": {"loss": 1.0}, **{f"{name} (stage {i + 1})": {"loss": loss + len(names) - 1 - i, "ppl": 1.0}
                                                   for i, name in enumerate(names)}}
        (job / "summary.json").write_text(json.dumps({"stage": "takd", "seed": 0, "models": models, "stages": stages}))
        for i, name in enumerate(names):  # stage k: 10·k s at 100·k tokens/s
            stage = job / f"stage{i + 1}_{name}"
            stage.mkdir()
            (stage / "summary.json").write_text(json.dumps({"timing": {"fit_seconds": 10.0 * (i + 1),
                                                                       "tokens_per_second": 100.0 * (i + 1)}}))
        (job / "csv").rename(job / f"stage{len(names)}_tiny" / "csv")
    write_report(tmp_path)
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["method"], float(r["loss"])) for r in rows] == [("takd.num_assistants=0", 3.0), ("takd.num_assistants=1", 2.0)]
    # one stage: 10 s at 100 tokens/s; two: 10 + 20 s, (1,000 + 4,000) tokens / 30 s
    assert float(rows[0]["wall_seconds"]) == 10.0 and float(rows[0]["tokens_per_second"]) == 100.0
    assert float(rows[1]["wall_seconds"]) == 30.0 and float(rows[1]["tokens_per_second"]) == pytest.approx(5000 / 30)
    assert (tmp_path / "val_loss.png").is_file()


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing")
    with pytest.raises(ReportError, match="no Hydra job directories"):
        write_report(tmp_path)
    for num in range(2):
        make_job(tmp_path, num, ["loss=kl", f"seed={num}"], num, 1.0, finished=False)
    with pytest.raises(ReportError, match=r"no finished runs .*: 2 job directories have no summary.json \(0, 1\)"):
        write_report(tmp_path)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    two_methods_three_seeds(tmp_path)
    main([str(tmp_path), "--no-plot"])
    assert "| `loss=kl` | 0,1,2 | 2.0000 ± 1.0000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "kd-report: error:" in capsys.readouterr().err


def test_a_sweep_with_baseline_false_does_not_blame_an_older_kd_lightning(tmp_path: Path) -> None:
    """#24: the CE-only row is absent because the runs asked for none, not because of an old version."""
    for seed in (0, 1):
        job = make_job(tmp_path, seed, ["loss=kl", f"seed={seed}", "baseline=false"], seed, 1.0 + seed)
        summary = json.loads((job / "summary.json").read_text())
        del summary["models"]["student (CE only)"]
        (job / "summary.json").write_text(json.dumps(summary))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "baseline": False}))
    text = write_report(tmp_path)
    assert "Not computed: CE-only loss (every run was started with baseline=false)." in text
    # a column that really is missing still says so, without the CE-only loss
    assert [line for line in text.splitlines() if "older kd-lightning" in line] == [
        "Not in these summaries (older kd-lightning): ECE (15-bin)."]

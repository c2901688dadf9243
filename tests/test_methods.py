"""`benchmarks/methods.py`: the multiruns it launches (dry run) and its combined tables on synthetic
multirun directories; one slow smoke run of `--quick --dataset digits`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "methods.py"


def load_methods():
    spec = importlib.util.spec_from_file_location("benchmarks_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


methods = load_methods()


def planned(tmp_path: Path, *argv: str) -> list[tuple[str, Path, list[str]]]:
    args, extra = methods.parse_args(["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *argv])
    return methods.commands(args, extra)


def hydra_args(argv: list[str]) -> list[str]:
    return argv[argv.index("-m") + 1:]


def sweep_params(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in yaml.safe_load((REPO / "conf" / "sweep" / f"{name}.yaml").read_text())
            ["hydra"]["sweeper"]["params"].items()}


def test_takd_and_multi_teacher_arms_match_the_sweep_presets_and_share_the_common_settings(tmp_path: Path) -> None:
    runs = planned(tmp_path, "--arms", "losses,takd,multi_teacher", "--steps", "100")
    by_arm: dict[str, list[list[str]]] = {}
    for arm, sweep_dir, argv in runs:
        by_arm.setdefault(arm, []).append(hydra_args(argv))
        assert sweep_dir.parent.name in {"seed0", "seed1", "seed2"}
    assert {arm: len(v) for arm, v in by_arm.items()} == {"losses": 3, "takd": 3, "multi_teacher": 3}
    takd, multi = by_arm["takd"][0], by_arm["multi_teacher"][0]
    assert "experiment=takd" in takd
    assert f"takd.num_assistants={sweep_params('takd')['takd.num_assistants']}" in takd
    assert "teacher=ensemble" in multi
    assert f"callbacks={sweep_params('multi_teacher')['callbacks']}" in multi
    # the same budget, eval split size, cache and CE-only baseline as the existing arms
    common = [a for a in by_arm["losses"][0] if not a.startswith(("loss=", "hydra.sweep.dir="))]
    for argv in (takd, multi):
        assert [a for a in argv if a in common] == common


def test_quick_shortens_every_teachers_pretraining(tmp_path: Path) -> None:
    runs = {arm: hydra_args(argv) for arm, _, argv in planned(tmp_path, "--quick", "--arms", "losses,takd,multi_teacher")}
    assert "teacher.pretrain.max_steps=60" in runs["losses"] and "teacher.pretrain.max_steps=60" in runs["takd"]
    assert "teacher.pretrain.max_steps=60" not in runs["multi_teacher"]
    assert {"teacher.members.moe.pretrain.max_steps=60", "teacher.members.dense.pretrain.max_steps=60"} <= set(runs["multi_teacher"])
    # the default --quick selection is unchanged (it is the ~75 s smoke test)
    assert [arm for arm, _, _ in planned(tmp_path, "--quick")] == ["losses", "temperature", "moe"]


def test_digits_arms(tmp_path: Path) -> None:
    runs = planned(tmp_path, "--dataset", "digits")
    arms = []
    for arm, sweep_dir, argv in runs:
        args = hydra_args(argv)
        arms.append(arm)
        assert sweep_dir.is_relative_to(tmp_path / "digits" / arm)
        assert any(a in args for a in ("experiment=digits", "experiment=digits_ensemble"))
        # the experiment's own budget; no language-model-only keys, no MoE teacher
        assert not any(a.startswith(("trainer.max_steps=", "dataset.max_eval_tokens=", "trainer.val_check_interval="))
                       for a in args)
        assert not any("moe" in a or "sar" in a for a in args)
    assert sorted(set(arms)) == ["gap", "losses", "multi_teacher", "takd", "temperature"]
    by_dir = {sweep_dir.name: hydra_args(argv) for _, sweep_dir, argv in runs}
    assert "loss=" + ",".join(methods.LOSSES) in by_dir["losses"] and "uld" not in " ".join(by_dir["losses"])
    assert "temperature.initial=1.0,2.0,4.0,8.0" in by_dir["constant"]
    assert {"stage=takd", "+takd.num_assistants=0,1,2", "student.model.hidden_sizes=[8]"} <= set(by_dir["takd"])
    assert {"loss=kl,taid", "student.model.hidden_sizes=[8]"} <= set(by_dir["gap"])
    assert "callbacks=none,confidence,ca_mkd,performance_gap,reinforced" in by_dir["multi_teacher"]
    with pytest.raises(SystemExit, match="unknown arm 'moe'"):
        planned(tmp_path, "--dataset", "digits", "--arms", "moe")


def make_job(root: Path, overrides: list[str], seed: int, models: dict, *, task: str = "causal_lm",
             stages: list[str] | None = None) -> None:
    job = root / f"seed{seed}" / str(len(list(root.glob(f"seed{seed}/*"))))
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    summary = {"loss": "kl", "seed": seed, "task": task, "models": models,
               "timing": {"fit_seconds": 2.0, "tokens_per_second": 100.0}}
    if stages:  # a TAKD chain: per-stage summaries with timings, rows `<name> (stage i)`
        summary["stages"] = []
        for i, name in enumerate(stages, 1):
            (job / f"stage{i}_{name}").mkdir()
            (job / f"stage{i}_{name}" / "summary.json").write_text(json.dumps({"timing": summary["timing"]}))
            summary["stages"].append({"student": name, "output_dir": f"/elsewhere/stage{i}_{name}"})
    (job / "summary.json").write_text(json.dumps(summary))


def row(out: str, method: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| `{method}`") or line.startswith(f"| {method} "))
    return [c.strip() for c in line.strip("|").split("|")]


def test_combined_table_reports_takd_last_stage_paired_per_seed(tmp_path: Path) -> None:
    root = tmp_path / "takd"
    for seed, (base, direct, chain) in enumerate([(3.0, 2.9, 2.8), (2.0, 1.8, 1.9), (4.0, 3.9, 3.7)]):
        teacher = {"loss": 1.0, "ppl": math.e}
        ce = {"loss": base, "ppl": math.exp(base), "ece": 0.01}
        make_job(root, ["takd.num_assistants=0"], seed, {"teacher:moe": teacher, "tiny (stage 1)": {"loss": direct},
                                                          "student (CE only)": ce}, stages=["tiny"])
        make_job(root, ["takd.num_assistants=1"], seed, {"teacher:moe": teacher, "ta1 (stage 1)": {"loss": 0.5},
                                                          "tiny (stage 2)": {"loss": chain}, "student (CE only)": ce},
                 stages=["ta1", "tiny"])
    text = methods.combined_table(tmp_path, ["takd", "missing_arm"])
    direct = row(text, "takd.num_assistants=0")
    assert direct[1] == "0,1,2" and direct[3] == "-0.1333 ± 0.0577" and direct[4] == "-0.1000 / -0.2000 / -0.1000"
    assert row(text, "takd.num_assistants=1")[4] == "-0.2000 / -0.1000 / -0.3000"
    assert row(text, "*student (CE only)*")[4] == "+0.0000 / +0.0000 / +0.0000"
    assert "accuracy" not in text and "tokens/s" in text and "missing_arm" not in text
    assert (root / "results.md").is_file()


def test_combined_table_classifier_has_accuracy_and_samples_per_second(tmp_path: Path) -> None:
    root = tmp_path / "losses"
    for seed in range(2):
        make_job(root, ["loss=kl"], seed, {"teacher:mlp": {"loss": 0.1, "accuracy": 0.99},
                                           "student (KD)": {"loss": 0.2 + seed, "accuracy": 0.9 + 0.02 * seed},
                                           "student (CE only)": {"loss": 0.3 + seed, "accuracy": 0.88}},
                 task="classification")
    text = methods.combined_table(tmp_path, ["losses"])
    header = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert header[5] == "accuracy" and header[-1] == "samples/s"
    kd = row(text, "loss=kl")
    assert kd[2] == "0.7000 ± 0.7071" and kd[4] == "-0.1000 / -0.1000" and kd[5] == "0.9100 ± 0.0141"
    assert row(text, "*teacher*")[5] == "0.9900 ± 0.0000"


@pytest.mark.slow
def test_quick_digits_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dataset", "digits", "--arms", "losses,takd",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "digits" / "methods.md").read_text()
    assert "`loss=kl`" in text and "`loss=skew_kl`" in text and "*student (CE only)*" in text
    assert "### takd" in text and "no results" not in text and "unfinished" not in text
    timings = json.loads((out / "digits" / "timings.json").read_text())
    assert all(t["rc"] == 0 for t in timings["multiruns"].values())


def test_combined_table_lists_every_teacher_of_an_ensemble(tmp_path: Path) -> None:
    root = tmp_path / "multi_teacher"
    for seed in range(2):
        for weighting in ("none", "ca_mkd"):
            make_job(root, [f"callbacks={weighting}"], seed,
                     {"teacher:wide": {"loss": 0.1}, "teacher:narrow": {"loss": 0.2},
                      "student (KD)": {"loss": 0.4}, "student (CE only)": {"loss": 0.5}})
    text = methods.combined_table(tmp_path, ["multi_teacher"])
    assert row(text, "*teacher:wide*")[2] == "0.1000 ± 0.0000" and row(text, "*teacher:narrow*")[3] == "-0.3000 ± 0.0000"
    assert "| *teacher* |" not in text and text.strip().splitlines()[-1].startswith("| *student (CE only)* |")


def test_teacher_outputs_are_reused_by_default_and_no_reuse_turns_it_off(tmp_path: Path) -> None:
    default = [hydra_args(argv) for _, _, argv in planned(tmp_path, "--arms", "losses")]
    off = [hydra_args(argv) for _, _, argv in planned(tmp_path, "--arms", "losses", "--no-reuse")]
    assert all("teacher_outputs.reuse=true" in a for a in default)
    assert not any("teacher_outputs.reuse=true" in a for a in off)

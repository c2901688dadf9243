"""Sweep presets (conf/sweep/, conf/hydra/launcher/, sweeps/): every grid point composes, and one
preset runs for real through `python train.py -m` and `kd-report`."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from tests.conftest import CONF, REPO, TINY_LM_DATA, TINY_TEACHER, TINY_TRAINER

GRID_PRESETS = ["losses", "temperature", "takd", "moe", "multi_teacher"]
PARSER = OverridesParser.create()


def preset_params(name: str) -> dict[str, list[str]]:
    """hydra.sweeper.params of conf/sweep/<name>.yaml as override strings per key."""
    params = OmegaConf.load(CONF / "sweep" / f"{name}.yaml").hydra.sweeper.params
    out = {}
    for key, value in params.items():
        override = PARSER.parse_override(f"{key}={value}")
        out[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(value)]
    return out


def preset_defaults(name: str) -> dict[str, list[str]]:
    """`override /<group>: <option>` entries of the preset's defaults list, as {group: [option]}."""
    entries = OmegaConf.load(CONF / "sweep" / f"{name}.yaml").get("defaults") or []
    return {key.removeprefix("override /"): [str(value)] for entry in entries for key, value in entry.items()}


def missing_options(params: dict[str, list[str]]) -> list[str]:
    """Options of config groups (conf/<key>/) that the preset names and that do not exist (yet)."""
    missing = []
    for key, values in params.items():
        if not (CONF / key).is_dir():
            continue
        for value in values:
            for option in value.strip("[]").split(","):
                if option not in ("none", "null", "") and not (CONF / key / f"{option}.yaml").is_file():
                    missing.append(f"conf/{key}/{option}.yaml")
    return missing


def compose_cfg(overrides: list[str], hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_config)


def test_losses_preset_lists_every_loss() -> None:
    """Every conf/loss option, once (each works from teacher logits; sparse_kl sparsifies online)."""
    listed = preset_params("losses")["loss"]
    assert len(listed) == len(set(listed))
    # every option that works on the default (single-tokenized) data; `needs:` losses are refused there
    single = {p.stem for p in (CONF / "loss").glob("*.yaml") if OmegaConf.load(p).get("needs") is None}
    assert set(listed) == single, "conf/sweep/losses.yaml is out of date with conf/loss/"


@pytest.mark.parametrize("name", GRID_PRESETS)
def test_grid_preset_every_point_composes(name: str) -> None:
    params = preset_params(name)
    assert params.pop("seed") == ["0", "1", "2"]
    missing = missing_options({**params, **preset_defaults(name)})
    if missing:
        pytest.skip(f"+sweep={name} waits for {', '.join(missing)}")
    keys = list(params)
    for values in itertools.product(*(params[k] for k in keys)):
        overrides = [f"{k}={v}" for k, v in zip(keys, values)]
        cfg = compose_cfg([f"+sweep={name}", *overrides])
        for key, value in zip(keys, values):
            if not (CONF / key).is_dir():  # a plain key: the value reached the config
                assert str(OmegaConf.select(cfg, key)) == value, (name, key)


def test_optuna_preset_composes() -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg(["+sweep=optuna"], hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"temperature.initial", "distill.kd_weight", "distill.ce_weight", "optimizer.lr"}
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"optuna searches {key}, which the config lacks"
    assert cfg.baseline is False


@pytest.mark.parametrize(("launcher", "plugin", "target"), [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
])
def test_launcher_presets_compose(launcher: str, plugin: str, target: str) -> None:
    pytest.importorskip(plugin)
    cfg = compose_cfg(["+sweep=losses", f"hydra/launcher={launcher}"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_wandb_sweep_matches_the_losses_preset() -> None:
    sweep = yaml.safe_load((REPO / "sweeps" / "wandb_losses.yaml").read_text())
    assert sweep["program"] == "train.py" and sweep["method"] == "grid"
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert sweep["parameters"]["loss"]["values"] == preset_params("losses")["loss"]
    assert sweep["parameters"]["seed"]["values"] == [0, 1, 2]
    # What an agent runs composes: `python train.py loss=... seed=... logger=[csv,wandb]`.
    cfg = compose_cfg(["loss=kl", "seed=2", f"logger={sweep['parameters']['logger']['value']}"])
    assert set(cfg.logger) == {"csv", "wandb"} and cfg.seed == 2


def test_sweeps_readme_names_every_preset() -> None:
    readme = (REPO / "sweeps" / "README.md").read_text()
    for preset in sorted((CONF / "sweep").glob("*.yaml")):
        assert f"+sweep={preset.stem}" in readme
    for launcher in sorted((CONF / "hydra" / "launcher").glob("*.yaml")):
        assert f"hydra/launcher={launcher.stem}" in readme


@pytest.mark.slow
def test_losses_sweep_runs_and_reports(tmp_path: Path, cache_dir: Path) -> None:
    """Two tiny runs of `+sweep=losses` through the real CLI (`-m`: Hydra's multirun), then `kd-report`
    on the sweep; the second run reads the first one's teacher outputs and the report shows the time
    saved. (This took over tests/test_cli.py's multirun test and tests/test_teacher_outputs.py's
    report test, which ran the same two-run sweep each.)"""
    from kd_lightning.report import write_report

    sweep_dir = tmp_path / "multirun"
    tiny = TINY_TRAINER + TINY_LM_DATA + TINY_TEACHER
    command = [sys.executable, "train.py", "-m", "+sweep=losses", "loss=kl,reverse_kl", "seed=0", "baseline=false",
               *tiny, f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in range(2)]
    assert sorted(s["loss"] for s in summaries) == ["kl", "reverse_kl"]
    second = summaries[1]["teacher_outputs"]
    assert second["computed_rows"] == 0 and second["hit_rows"] > 0

    report = subprocess.run([sys.executable, "-m", "kd_lightning.report", str(sweep_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "| `loss=kl` | 0 |" in report.stdout and "| `loss=reverse_kl` | 0 |" in report.stdout
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in rows] == [("loss=kl", "0"), ("loss=reverse_kl", "0")]
    assert all(float(r["loss"]) > 0 and 0 <= float(r["teacher_agreement"]) <= 1 for r in rows)
    assert (sweep_dir / "results.md").is_file()
    assert (sweep_dir / "val_loss.png").stat().st_size > 1000
    text = write_report(sweep_dir, plot=False)
    assert "## Teacher outputs" in text and "Teacher time saved: about" in text
    assert "2 of 2 run(s) reused teacher outputs" in text and "were read from the store by 2 run(s)" in text

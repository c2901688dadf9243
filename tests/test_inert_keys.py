"""Keys that do nothing are refused before compute, naming them (issue #24)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from kd_lightning.errors import ConfigError
from kd_lightning.run.checks import validate_config
from kd_lightning.run.checks.inert_keys import encoding_name
from kd_lightning.run.pipeline import run


def test_a_loss_key_no_loss_uses_is_refused_before_compute(make_cfg, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"loss\.alpha=2: loss=kl has no such option, so it would do nothing; "
                                          r"a loss's parameters live under loss\.fn$"):
        run(make_cfg("+loss.alpha=2", output_dir=out))
    assert not out.exists() or not any(out.iterdir())  # nothing written, nothing trained
    with pytest.raises(ConfigError, match=r"loss\.alpha=0\.2: .*loss=skew_kl's function takes it: set loss\.fn\.alpha=0\.2"):
        validate_config(make_cfg("loss=skew_kl", "+loss.alpha=0.2"))


def test_a_loss_function_parameter_it_does_not_take_is_refused(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"loss\.fn\.alpha=2: kd_lightning\.losses\.forward_kl \(loss=kl\) takes no "
                                          r"parameter 'alpha'; its parameters: reduction, value_form"):
        validate_config(make_cfg("+loss.fn.alpha=2"))  # before: "must lie in [0, 1]" for a loss without alpha
    validate_config(make_cfg("loss=skew_kl", "loss.fn.alpha=0.3"))  # a parameter it takes


def test_a_store_setting_the_encoding_ignores_is_refused(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("teacher=cached", "loss=sparse_kl", f"teacher_cache.dir={tmp_path / 'none'}")
    with open_dict(cfg):
        assert cfg.teacher_cache.encoding == "sample"
        cfg.teacher_cache.encoding = "topk"
        cfg.teacher_cache.temperature = 4.0
    assert encoding_name(cfg.teacher_cache) == "topk"
    with pytest.raises(ConfigError, match=r"teacher_cache\.temperature=4\.0: acts only with teacher_cache\.encoding=sample, "
                                          r"and this run has teacher_cache\.encoding=topk, so it would do nothing"):
        run(cfg)
    with open_dict(cfg):
        cfg.teacher_cache.temperature = 1.0
        cfg.teacher_cache.num_draws = 8
    with pytest.raises(ConfigError, match=r"teacher_cache\.num_draws=8: acts only with"):
        validate_config(cfg)


def test_store_settings_that_act_and_unused_nodes_pass(make_cfg) -> None:
    validate_config(make_cfg("stage=cache_teacher", "teacher_cache.temperature=2.0"))  # sample: it acts
    validate_config(make_cfg("teacher_cache.encoding=topk", "teacher_cache.temperature=4"))  # no store in this run
    with pytest.raises(ConfigError, match=r"teacher_outputs\.k=8: acts only with teacher_outputs\.encoding=topk or sample"):
        validate_config(make_cfg("teacher_outputs.reuse=true", "teacher_outputs.k=8"))

"""Validation before compute, in one place: a bad config, path or dataset stops the run before any
data is read or model built.

Every error is a `ConfigError` (a `ValueError`) with one line naming the config key as the user
writes it (`distill.kd_weight`, not an internal argument), the bad value and what to do.

- `check_config(cfg)`: every refusal of the composed config (`pipeline.run` calls it once):
  `validate_config(cfg)` (values: `values.py`; models: `models.py`; keys that cannot act on this
  run: `inert_keys.py`), offline teachers, models against the dataset's task, the strategy;
- `check_renamed_overrides(argv)`, `check_run_dir_argument(argv)`: what the command line alone
  shows, before Hydra composes (`cli.main`);
- `check_writable(path, key)` and `preflight.py`: the directories the run will write, `pretrained=`
  sources, teacher weights, the checkpoint's layout against the strategy;
- `check_seq_len_fits(...)`: `dataset.seq_len` against a built model's positions.

The data's own checks (empty records, one document dominating a split) are `kd_lightning.data.checks`.
"""

from kd_lightning.run.checks.models import check_local_pretrained, check_seq_len_fits
from kd_lightning.run.checks.preflight import (check_checkpoint_layout, check_pretrained_sources, check_run_dir_argument,
                                               check_store_dirs, check_teacher_weights)
from kd_lightning.run.checks.values import check_config, check_renamed_overrides, check_writable, validate_config

__all__ = ["check_checkpoint_layout", "check_config", "check_local_pretrained", "check_pretrained_sources",
           "check_renamed_overrides", "check_run_dir_argument", "check_seq_len_fits", "check_store_dirs",
           "check_teacher_weights", "check_writable", "validate_config"]

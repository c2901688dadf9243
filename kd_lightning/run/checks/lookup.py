"""Reading one value of the composed config by its dotted key, as the checks need it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError


def value_at(cfg: DictConfig, key: str) -> Any:
    """The resolved value at dotted `key`, or None when absent (a missing `???` value stays `???`)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent.keys():
        return None
    if OmegaConf.is_missing(parent, leaf):
        return "???"
    return parent[leaf]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number_at(cfg: DictConfig, key: str, integer: bool = False) -> float | int | None:
    value = value_at(cfg, key)
    if value is None:
        return None
    if not is_number(value) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}={value!r}: must be {kind}")
    return value

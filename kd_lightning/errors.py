"""Errors a user can act on, shared by every layer (a leaf: it imports nothing from kd_lightning)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


__all__ = ["ConfigError"]

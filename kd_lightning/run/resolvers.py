"""The config's own resolvers (OmegaConf `${name:args}`), registered once by `register_resolvers`.

- `${kd_packaged_gguf:<distribution>,<file>,<cache_dir>}`: the model directory converted once from a
  GGUF file shipped in an installed Python package (kd_lightning/teachers/packaged.py; teacher=smollm2).
  It runs when the config is first resolved, which `checks.check_packaged_models` does before any
  compute: a missing package stops the run there, naming what to pip install.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def packaged_gguf(distribution: str, filename: str, cache_dir: str) -> str:
    from kd_lightning.teachers.packaged import packaged_gguf_model

    return packaged_gguf_model(distribution, filename, cache_dir)


def register_resolvers() -> None:
    """Idempotent: the run layer's modules that resolve a config call it on import."""
    if not OmegaConf.has_resolver("kd_packaged_gguf"):
        OmegaConf.register_new_resolver("kd_packaged_gguf", packaged_gguf, use_cache=True)

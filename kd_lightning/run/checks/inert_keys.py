"""Keys that do nothing are refused before compute, naming them (issue #24).

An option that cannot act on this run is as misleading as a wrong one: `+loss.alpha=2` on a loss
without `alpha` was accepted and ignored; `teacher_cache.temperature=4` with the topk encoding was
recorded as 1.0 without a word. `refuse_inert_keys(cfg)` (called by `checks.validate_config`) raises
`ConfigError` for:

- a key of the `loss` node that no loss uses (`loss.alpha`; the loss's own parameters live under
  `loss.fn`), pointing at `loss.fn.<key>` when the loss function takes it;
- a `loss.fn.<key>` that the loss function does not take (it would fail at the first training step,
  after any teacher pre-training);
- a teacher-store setting that the chosen encoding ignores (`temperature` and `num_draws` act only
  with `sample`, `k` not with `full`, `dtype` not with `sample`), for `teacher_cache.*` when the run
  uses the offline targets and `teacher_outputs.*` with `teacher_outputs.reuse=true`. Only values
  that differ from `conf/train.yaml`'s are refused (the defaults are always present).
"""

from __future__ import annotations

import inspect
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.run import CONFIG_DIR

LOSS_NODE_KEYS = ("name", "fn", "chunk_size", "cross_vocab", "callback", "needs")  # what the run reads of `loss`
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# store setting -> the encodings it acts in (kd_lightning.teachers.encodings.Encoding.identity)
STORE_KEY_ENCODINGS = {"temperature": ("sample",), "num_draws": ("sample",), "k": ("topk", "sample"),
                       "dtype": ("full", "topk")}
TRAIN_YAML = Path(CONFIG_DIR) / "train.yaml"


def refuse_inert_keys(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming the first option that cannot act on this run (see the module doc)."""
    loss = cfg.get("loss")
    if isinstance(loss, DictConfig):
        _check_loss_node(loss)
    if _uses_teacher_cache(cfg):
        _check_store_node(cfg, "teacher_cache")
    outputs = cfg.get("teacher_outputs")
    if isinstance(outputs, DictConfig) and outputs.get("reuse"):
        _check_store_node(cfg, "teacher_outputs")


def _loss_parameters(target: str) -> tuple[set[str], bool] | None:
    """(keyword parameters, takes **kwargs) of the loss function `target`, None if it cannot be found."""
    from hydra.utils import get_method

    try:
        signature = inspect.signature(get_method(target))
    except Exception:  # noqa: BLE001 - an unknown target is reported by Hydra itself
        return None
    names = {p.name for p in signature.parameters.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _check_loss_node(loss: DictConfig) -> None:
    name = loss.get("name")
    fn = loss.get("fn")
    target = fn.get("_target_") if isinstance(fn, DictConfig) else None
    params = _loss_parameters(str(target)) if target else None
    for key in loss.keys():
        if key in LOSS_NODE_KEYS:
            continue
        hint = (f"; loss={name}'s function takes it: set loss.fn.{key}={loss.get(key)!r}"
                if params is not None and key in params[0] else "")
        raise ConfigError(f"loss.{key}={loss.get(key)!r}: loss={name} has no such option, so it would do nothing; "
                          f"a loss's parameters live under loss.fn{hint}")
    if params is None or params[1]:
        return
    accepted, _ = params
    for key in fn.keys():
        if key in HYDRA_KEYS or key in accepted:
            continue
        taken = sorted(accepted - {"student_logits", "teacher_logits", "mask", "temperature"})
        raise ConfigError(f"loss.fn.{key}={fn.get(key)!r}: {target} (loss={name}) takes no parameter '{key}'; "
                          f"its parameters: {', '.join(taken) or 'none'}")


def _uses_teacher_cache(cfg: DictConfig) -> bool:
    if str(cfg.get("stage")) == "cache_teacher":
        return True
    teacher = cfg.get("teacher")
    if not isinstance(teacher, DictConfig):
        return False
    members = teacher.get("teachers") or [teacher]
    return any(isinstance(t, DictConfig) and t.get("cached") for t in members)


@cache
def _defaults(node: str) -> dict[str, Any]:
    values = OmegaConf.to_container(OmegaConf.load(TRAIN_YAML).get(node) or {}, resolve=False)
    return values if isinstance(values, dict) else {}


def encoding_name(node: DictConfig) -> str | None:
    """The store encoding a node names: `encoding`, a string or a node with `name`."""
    value = node.get("encoding")
    if isinstance(value, DictConfig):
        value = value.get("name")
    return None if value is None else str(value)


def _check_store_node(cfg: DictConfig, node_name: str) -> None:
    node = cfg.get(node_name)
    if not isinstance(node, DictConfig):
        return
    encoding = encoding_name(node)
    if encoding is None:
        return
    key_of_encoding = f"{node_name}.encoding"
    defaults = _defaults(node_name)
    for key, acts_in in STORE_KEY_ENCODINGS.items():
        if key not in node or encoding in acts_in or key not in defaults:
            continue
        value = node.get(key)
        if value is None or value == defaults[key]:
            continue
        raise ConfigError(f"{node_name}.{key}={value!r}: acts only with {key_of_encoding}="
                          f"{' or '.join(acts_in)}, and this run has {key_of_encoding}={encoding}, so it would do "
                          f"nothing; remove it, or choose {key_of_encoding}={acts_in[0]}")

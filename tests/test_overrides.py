"""Hooks say they override (house style, as Lightning's own callbacks): every method of a class in
kd_lightning/callbacks/ or kd_lightning/data/ that redefines a base class's method (a Lightning
hook, a torch Dataset/Sampler/DataLoader method, or a template method of our own base) carries
`@override` (typing_extensions), so a renamed hook in a base class is caught by a type checker."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"
MODULES = sorted(f"kd_lightning.{folder}.{path.stem}" for folder in ("callbacks", "data")
                 for path in (PACKAGE / folder).glob("*.py") if path.stem != "__init__")


def missing_overrides(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module_name:
            continue
        for name, member in vars(cls).items():
            if name == "__init__" or not inspect.isfunction(member):
                continue
            overridden = [base for base in cls.__mro__[1:] if base is not object and name in vars(base)]
            if overridden and not getattr(member, "__override__", False):
                missing.append(f"{cls.__qualname__}.{name} (overrides {overridden[0].__qualname__})")
    return missing


@pytest.mark.parametrize("module_name", MODULES)
def test_every_override_is_marked(module_name: str) -> None:
    missing = missing_overrides(module_name)
    assert not missing, f"{module_name}: add @override to " + ", ".join(missing)

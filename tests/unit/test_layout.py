"""The package's floors (docs/architecture.md): no module imports from a higher floor or from
another folder of its own floor, whether at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
FLOORS = {
    "errors": 1,
    "config": 1,
    "mixing": 1,
    "tables": 1,
    "cli": 2,
    "data": 2,
    "models": 2,
    "methods": 3,
    "recipe": 4,
    "runs": 5,
    "evaluation": 6,
    "training": 7,
    "tools": 8,
    "demo": 9,
}
EXEMPT = {"__init__", "__main__"}  # the package's lazy re-export and `python -m pipeline`


def _unit(path: Path) -> str:
    """`pipeline/runs/journal.py` → `runs`; `pipeline/recipe.py` → `recipe`."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1:
                units.add(parts[1])
    return units


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _unit(p) not in EXEMPT)


def test_every_unit_has_a_floor():
    assert {_unit(p) for p in MODULES} == set(FLOORS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_only(path):
    own = _unit(path)
    for unit in _imported_units(path) - {own}:
        assert FLOORS[unit] < FLOORS[own], f"{path.relative_to(PACKAGE)} imports pipeline.{unit}"

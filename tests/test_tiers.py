"""Every test module names its tier (docs/testing.md) as a module-level ``pytestmark``."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TIERS = {"unit", "model", "structure", "integration"}


def _module_marks(path: Path) -> set[str]:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return {n.attr for n in ast.walk(node.value)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                    and n.value.attr == "mark"}
    return set()


def test_every_module_has_exactly_one_tier():
    modules = sorted(Path(__file__).parent.glob("test_*.py"))
    assert len(modules) > 10
    wrong = {m.name: sorted(_module_marks(m) & TIERS) for m in modules if len(_module_marks(m) & TIERS) != 1}
    assert not wrong, f"modules without exactly one tier marker: {wrong}"

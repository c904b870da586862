"""``plans`` is an installed top-level package of this project (filled by the plans issue)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import plans


def test_plans_is_this_projects_installed_package() -> None:
    repo = Path(__file__).resolve().parents[2]
    assert Path(plans.__file__).resolve() == repo / "plans" / "__init__.py"
    owners = importlib.metadata.packages_distributions()
    assert "smartmeter-ophyd" in owners["plans"]
    assert "smartmeter-ophyd" in owners["smartmeter_ophyd"]

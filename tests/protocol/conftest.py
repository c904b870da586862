"""The codec's tests run under the leak guard (they need no I/O, so nothing may leak) and
with warnings as errors."""

from pathlib import Path

import pytest

from tests.leak_guard import _leak_guard_tasks, leak_guard  # noqa: F401 (autouse guard)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Warnings are errors here (not yet project-wide: see docs/explanations/architecture.md)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings("error"))

"""The codec's tests run under the leak guard too (they must not need it: no I/O here)."""

from tests.leak_guard import _leak_guard_tasks, leak_guard  # noqa: F401 (autouse guard)

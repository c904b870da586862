#!/usr/bin/env bash
# The one test command: set up, start the services, run pytest, ruff, mypy and import-linter,
# stop the services.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/protocol  # extra arguments go to pytest (ruff and mypy still run)
#   bash scripts/test.sh -n 0 tests/cli  # in this process (no pytest-xdist workers)
#
# pytest runs in two pytest-xdist worker processes, one test file each at a time
# (--dist loadfile: a module's fixtures stay in one process).  The suite mostly waits on real
# time (meters sampling, syncs, timeouts): one process keeps about 0.4 of a core busy, and two
# halve the wall time on a 2-core host.
#
# Exit status: pytest's, except that "no tests collected" (pytest exit 5) and a ruff, mypy or
# import-linter failure after a green pytest count as failure (1).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"

say() { printf 'test: %s\n' "$*"; }

bash scripts/setup.sh || { say "scripts/setup.sh failed"; exit 1; }

# Services someone already started (e.g. a developer's `scripts/services.sh start`) are reused
# and left running; the ones started here are stopped on any exit.
if bash scripts/services.sh status >/dev/null 2>&1; then
  say "reusing running services"
  bash scripts/services.sh status
else
  trap 'bash scripts/services.sh stop >/dev/null || say "services.sh stop failed"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # postgres is not started here: tests/storage/conftest.py runs its own private cluster.
  bash scripts/services.sh start ntp mqtt || { say "scripts/services.sh start failed"; exit 1; }
fi
export SMARTMETER_SERVICES_ENV="$ROOT/var/run/services.env"

say "pytest ..."
"$PY" -m pytest -q -n 2 --dist loadfile --durations=30 "$@"
pytest_rc=$?

say "ruff check . ..."
"$PY" -m ruff check .
ruff_rc=$?

say "mypy --strict smartmeter_ophyd/protocol smartmeter_ophyd/client (imported packages not reported) ..."
"$PY" -m mypy --strict --follow-imports=silent smartmeter_ophyd/protocol smartmeter_ophyd/client
mypy_rc=$?

say "lint-imports (layers, the emulator's imports, private modules; pyproject.toml) ..."
PYTHONPATH="$ROOT" "$ROOT/.venv/bin/lint-imports" --no-cache
imports_rc=$?

rc=$pytest_rc
if ((pytest_rc == 5)); then
  say "FAILED: pytest collected no tests (exit 5)"
  rc=1
elif ((pytest_rc == 0 && (ruff_rc != 0 || mypy_rc != 0 || imports_rc != 0))); then
  rc=1
fi
say "pytest=$pytest_rc ruff=$ruff_rc mypy=$mypy_rc lint-imports=$imports_rc -> exit $rc"
exit "$rc"

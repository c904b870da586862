#!/usr/bin/env bash
# The one main-job command: set up, then record from emulated meters into the embedded catalog.
#
#   bash scripts/demo.sh [args for python -m smartmeter_ophyd.demo]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

if [[ ! -f smartmeter_ophyd/demo.py && ! -f smartmeter_ophyd/demo/__main__.py ]]; then
  echo "demo: smartmeter_ophyd.demo is not written yet; until it lands, see" >&2
  echo "demo: docs/how-to/run-the-emulator.md to run emulated meters by hand" >&2
  exit 1
fi
exec "$ROOT/.venv/bin/python" -m smartmeter_ophyd.demo "$@"

#!/usr/bin/env bash
# The one main-job command: set up, then record from emulated meters into the embedded catalog.
#
#   bash scripts/demo.sh [args for python -m smartmeter_ophyd.demo]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

exec "$ROOT/.venv/bin/python" -m smartmeter_ophyd.demo "$@"

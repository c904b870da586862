#!/usr/bin/env bash
# The one main-job command: set up, then `smartmeter record` with no host - two emulated
# meters and their SNTP time server, synchronized_fly into the embedded catalog, a progress
# bar per meter, a summary table and two PNGs (where they are is printed at the end).
#
#   bash scripts/demo.sh [smartmeter record options, e.g. --duration 30 --emulate 3]
#
# The catalog, HDF5 files and plots go to $SMARTMETER_DATA_DIR (default: var/smartmeter in
# this checkout); `smartmeter runs`, `smartmeter plot RUN`, `smartmeter export RUN` read it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh --main  # only what the main job needs (the tests install the rest)

export SMARTMETER_DATA_DIR="${SMARTMETER_DATA_DIR:-$ROOT/var/smartmeter}"
exec "$ROOT/.venv/bin/python" -m smartmeter_ophyd.cli record "$@"

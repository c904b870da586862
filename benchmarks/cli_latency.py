"""What a user waits for around a command: a new catalog's set-up and the program's exit.

* **Set-up of a new embedded catalog** (``setup_embedded_catalog`` on a fresh directory, the
  first ``smartmeter record`` or ``scripts/demo.sh`` on a new machine), against the baseline
  Tiled offers: ``tiled.catalog.from_uri(..., init_if_not_exists=True)``, which runs
  ``tiled catalog init`` in a subprocess.  Tiled is imported before either is timed.
* **A short command, start to exit**: ``smartmeter runs`` on an empty catalog through the
  installed program (which exits with its objects frozen, ``cli.__main__.run``), against
  the same command through ``cli.__main__.main`` in a plain interpreter, whose final garbage
  collections walk every object of Tiled, dask and pandas.

Medians of ``--repeat`` runs each, alternating.  Last line:
``new catalog: X s (Tiled's init subprocess: Y s); smartmeter runs: A s (plain exit: B s)``.

Usage: ``python benchmarks/cli_latency.py [--repeat 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from smartmeter_ophyd.storage import setup_embedded_catalog

PROGRAM = Path(sys.executable).with_name("smartmeter")
PLAIN_EXIT = ("import sys; from smartmeter_ophyd.cli.__main__ import main; "
              "sys.argv = ['smartmeter', *sys.argv[1:]]; sys.exit(main())")


def catalog_setup(directory: Path) -> float:
    start = time.perf_counter()
    setup_embedded_catalog(directory / "ours", profile="latency",
                           profiles_dir=directory / "profiles")
    return time.perf_counter() - start


def tiled_init(directory: Path) -> float:
    from tiled.catalog import from_uri

    (directory / "theirs").mkdir()
    start = time.perf_counter()
    from_uri(f"sqlite:///{directory / 'theirs' / 'catalog.db'}", init_if_not_exists=True)
    return time.perf_counter() - start


def command(argv: Sequence[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    import tiled.catalog  # noqa: F401 - imported before anything is timed

    ours, theirs, frozen, plain = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        for k in range(args.repeat):
            (root / f"a{k}").mkdir()
            (root / f"b{k}").mkdir()
            theirs.append(tiled_init(root / f"a{k}"))
            ours.append(catalog_setup(root / f"b{k}"))
        env = {**os.environ, "SMARTMETER_DATA_DIR": str(root / "data"),
               "TILED_PROFILES": str(root / "cli-profiles")}
        setup_embedded_catalog(root / "data" / "catalog", profile="smartmeter",
                               profiles_dir=root / "cli-profiles")  # what `record` makes
        command([str(PROGRAM), "runs"], env)
        for _ in range(args.repeat):
            frozen.append(command([str(PROGRAM), "runs"], env))
            plain.append(command([sys.executable, "-c", PLAIN_EXIT, "runs"], env))
    for label, values in (("new catalog, setup_embedded_catalog", ours),
                          ("baseline: Tiled's init_if_not_exists (subprocess)", theirs),
                          ("smartmeter runs, installed program", frozen),
                          ("baseline: the same through main() with a plain exit", plain)):
        print(f"{label:52s} median {statistics.median(values):5.2f} s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    print(f"new catalog: {statistics.median(ours):.2f} s (Tiled's init subprocess: "
          f"{statistics.median(theirs):.2f} s); smartmeter runs: {statistics.median(frozen):.2f} s "
          f"(plain exit: {statistics.median(plain):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

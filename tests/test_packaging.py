"""Packaging: what imports what, what is declared, where the version lives, the licence.

* ``import smartmeter_ophyd`` / ``smartmeter_ophyd.devices`` / ``plans`` load no Tiled, dask,
  pandas, numba, xarray or matplotlib (checked in a fresh interpreter's ``sys.modules``);
  ``smartmeter_ophyd.devices`` alone loads no h5py, event_model, aiomqtt or zeroconf either;
  the codec and the client load no ophyd or bluesky.
* Every third-party module the package imports belongs to a declared distribution (core, or
  the extra its optional module needs), and every core dependency is imported somewhere.
* Upper version caps only on the two dependencies whose internals the code uses.
* The main job's modules import with every test-only package missing.
* One version: ``smartmeter_ophyd.__version__``, which pyproject reads.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import smartmeter_ophyd
import smartmeter_ophyd.storage as storage

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
HEAVY = ("tiled", "dask", "pandas", "numba", "bluesky_tiled_plugins", "databroker", "xarray",
         "matplotlib", "sqlalchemy", "pyarrow")
CAPPED = {"tiled", "bluesky-tiled-plugins"}
"""Dependencies whose internals the code uses (storage/_direct.py, storage/_consolidator.py)."""
MAIN_JOB_MODULES = (
    "smartmeter_ophyd.cli.__main__", "smartmeter_ophyd.cli._record", "smartmeter_ophyd.cli._runs",
    "smartmeter_ophyd.emulator", "plans", "smartmeter_ophyd.storage._service",
    "smartmeter_ophyd.storage._direct", "smartmeter_ophyd.storage._catalog",
    "smartmeter_ophyd.storage._readback", "smartmeter_ophyd.plotting",
    "smartmeter_ophyd.readback", "smartmeter_ophyd.quiet",
)


def loaded_after(statement: str, *, block: tuple[str, ...] = ()) -> set[str]:
    """Top-level modules in ``sys.modules`` after ``statement`` in a fresh interpreter, where
    importing any module in ``block`` raises ImportError (as if it were not installed)."""
    code = f"""
import importlib.abc, json, sys
BLOCK = {block!r}
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, Missing())
{statement}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"{statement!r} failed:\n{done.stderr[-3000:]}"
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_devices_and_plans_load_no_catalog_stack() -> None:
    loaded = loaded_after("import smartmeter_ophyd, smartmeter_ophyd.devices, plans")
    assert not loaded & set(HEAVY), f"heavy modules loaded: {sorted(loaded & set(HEAVY))}"
    assert {"ophyd", "bluesky", "h5py"} <= loaded  # the check itself sees imports


def test_devices_load_only_what_constructing_a_meter_needs() -> None:
    """HDF5 (h5py, hdf5plugin), documents (event_model), MQTT (aiomqtt) and discovery
    (zeroconf) load with the first fly or first use, not with ``smartmeter_ophyd.devices``
    (the import-time budget, issue 12); constructing a SmartMeter loads none of them either."""
    loaded = loaded_after(
        "import smartmeter_ophyd.devices as d\n"
        "d.SmartMeter('127.0.0.1', name='m', data_directory='.')"
    )
    later = {*HEAVY, "h5py", "hdf5plugin", "event_model", "jsonschema", "aiomqtt", "zeroconf",
             "bluesky"}
    assert not loaded & later, sorted(loaded & later)
    assert "ophyd" in loaded  # the check itself sees imports
    names = loaded_after("from smartmeter_ophyd.devices import AlignmentStream, MeterMqttStatus")
    assert "h5py" in names  # the lazy names resolve (AlignmentStream reads HDF5)


def test_bare_package_and_storage_package_load_nothing_heavy() -> None:
    loaded = loaded_after("import smartmeter_ophyd, smartmeter_ophyd.storage")
    assert not loaded & {*HEAVY, "ophyd", "bluesky", "h5py"}, sorted(loaded)


def test_codec_and_client_load_no_ophyd_or_bluesky() -> None:
    loaded = loaded_after("import smartmeter_ophyd.protocol, smartmeter_ophyd.client")
    assert not loaded & {*HEAVY, "ophyd", "bluesky", "h5py", "event_model"}, sorted(loaded)


def test_storage_names_resolve_lazily_to_their_submodules() -> None:
    assert sorted(storage.__all__) == sorted(storage._SUBMODULE)
    for name in storage.__all__:
        value = getattr(storage, name)
        module = sys.modules[f"smartmeter_ophyd.storage.{storage._SUBMODULE[name]}"]
        assert value is getattr(module, name)
    assert set(storage.__all__) <= set(dir(storage))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        storage.no_such_name  # noqa: B018


def test_main_job_imports_without_test_only_packages() -> None:
    test_only = ("pytest", "hypothesis", "aiomqtt", "zeroconf", "bluesky_queueserver",
                 "happi", "importlinter", "mypy", "ruff")
    statement = "\n".join(f"import {m}" for m in MAIN_JOB_MODULES)
    loaded = loaded_after(statement, block=test_only)
    assert "smartmeter_ophyd" in loaded


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> files of the package that import it."""
    found: dict[str, set[str]] = {}
    for root in ("smartmeter_ophyd", "plans"):
        for path in (ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("smartmeter_ophyd",
                                                                          "plans"):
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _declared(requirements: list[str]) -> set[str]:
    return {metadata_name(Requirement(r).name) for r in requirements}


def metadata_name(name: str) -> str:
    return name.lower().replace("_", "-")


def test_every_import_is_declared_and_every_core_dependency_used() -> None:
    distributions = metadata.packages_distributions()
    core = _declared(PROJECT["dependencies"])
    extras = {extra: _declared(reqs)
              for extra, reqs in PROJECT["optional-dependencies"].items()}
    optional = set().union(*(reqs for name, reqs in extras.items() if name != "test"))
    imported: set[str] = set()
    undeclared = []
    for module, files in sorted(_third_party_imports().items()):
        dists = {metadata_name(d) for d in distributions.get(module, [])}
        assert dists, f"{module} (imported by {sorted(files)}) is not installed"
        imported |= dists
        if not dists & (core | optional):
            undeclared.append(f"{module} ({'/'.join(sorted(dists))}) imported by {sorted(files)}")
    assert not undeclared, "imported but not declared in [project]: " + "; ".join(undeclared)
    unused = core - imported
    assert not unused, f"declared in [project] dependencies but never imported: {sorted(unused)}"


def test_upper_caps_only_where_internals_are_used() -> None:
    every = PROJECT["dependencies"] + [
        r for reqs in PROJECT["optional-dependencies"].values() for r in reqs]
    capped = {metadata_name(Requirement(r).name) for r in every
              if any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(r).specifier)}
    assert capped == CAPPED


def test_one_version() -> None:
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "smartmeter_ophyd.__version__"}
    assert metadata.version("smartmeter-ophyd") == smartmeter_ophyd.__version__, (
        "installed metadata differ from smartmeter_ophyd.__version__: reinstall (pip install -e .)")


def test_licence_file_matches_pyproject() -> None:
    assert PROJECT["license"] == {"text": "BSD-3-Clause"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text

"""An import-linter contract type: no module imports another package's private module.

A private module is one whose name starts with a single ``_`` (``smartmeter_ophyd.client.
_async``).  Only modules inside the private module's own package may import it; everyone else
goes through the package's ``__init__`` (its public names).  Dunder modules (``__main__``)
are not private.  Lives under ``tests/`` because it is tooling, not library code; the test
command runs ``lint-imports`` with the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, output


def _private_package(module: str) -> str | None:
    """The package that owns the first private component of ``module`` (None: public)."""
    parts = module.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:index])
    return None


class PrivateModulesContract(Contract):
    """Configuration: none beyond the root packages of ``[tool.importlinter]``."""

    type_name = "private_modules"

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        violations = []
        for importer in sorted(graph.modules):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                owner = _private_package(imported)
                if owner is None or importer == owner or importer.startswith(owner + "."):
                    continue
                lines = [
                    detail["line_number"]
                    for detail in graph.get_import_details(importer=importer, imported=imported)
                ]
                violations.append((importer, imported, lines))
        return ContractCheck(kept=not violations, metadata={"violations": violations})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, imported, lines in check.metadata["violations"]:
            where = ", ".join(f"l.{n}" for n in lines)
            output.print_error(f"{importer} -> {imported} ({where})", bold=False)
            output.new_line()

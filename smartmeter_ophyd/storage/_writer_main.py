"""Entry point of the catalog writer process (``python -m smartmeter_ophyd.storage._writer_main``).

A module of its own so that ``-m`` does not execute ``_service`` a second time (the package
imports it), which would duplicate its classes.

Every document is in the catalog and every connection closed when ``main`` returns; the
process then exits with its objects frozen (``gc.freeze``), so that the interpreter's final
garbage collections skip Tiled's, SQLAlchemy's and pandas' objects (about a second, which
the acquisition's ``JournalSink.close`` would wait for).
"""

import gc
import sys

from ._service import main

if __name__ == "__main__":
    code = main()
    gc.freeze()
    sys.exit(code)

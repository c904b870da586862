"""Entry point of the catalog writer process (``python -m smartmeter_ophyd.storage._writer_main``).

A module of its own so that ``-m`` does not execute ``_service`` a second time (the package
imports it), which would duplicate its classes.
"""

import sys

from ._service import main

if __name__ == "__main__":
    sys.exit(main())

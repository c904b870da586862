"""Entry point of the alignment worker (``python -m smartmeter_ophyd.storage._alignment_main``).

A module of its own so that ``-m`` does not execute ``_alignment`` a second time.  Answers go
to a private copy of standard output; the descriptor 1 itself then points at standard error,
so that whatever a library prints cannot corrupt them.
"""

import os
import sys

from ._alignment import serve

if __name__ == "__main__":
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.exit(serve(sys.stdin.buffer, answers))

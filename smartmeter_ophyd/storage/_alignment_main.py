"""Entry point of the alignment worker (``python -m smartmeter_ophyd.storage._alignment_main``).

A module of its own so that ``-m`` does not execute ``_alignment`` a second time.  Answers go
to a private copy of standard output; the descriptor 1 itself then points at standard error,
so that whatever a library prints cannot corrupt them.  Once its input closes it exits at
once, without the interpreter's teardown (tenths of a second of numpy and h5py the caller
would wait for).
"""

import os
import sys

from ._alignment import serve

WORKER_NICENESS = 5
"""Below the acquisition process, which closes the meters' files at the same moment: the
alignment takes the CPU the acquisition leaves, never the other way round."""

if __name__ == "__main__":
    os.nice(WORKER_NICENESS)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    code = serve(sys.stdin.buffer, answers)
    answers.close()
    sys.stderr.flush()
    os._exit(code)  # nothing left to clean up: the caller waits for this exit

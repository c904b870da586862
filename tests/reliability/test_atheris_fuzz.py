"""Coverage-guided fuzzing of the decoders and the reply parser with atheris (issue 9).

The harness (atheris_decoders.py) runs in a child process - libFuzzer ends its process when
done - seeded with real firmware bytes (the info line, replies, frames with a log line
between them, §2.5, §4.6, §4.8), so the mutations start from inside the protocol.  The
test fails with the offending input if any input raises anything but the typed errors the
contract allows, or lets the decoder's buffer grow past its bound.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smartmeter_ophyd.protocol import COMMANDS
from tests.client.client_fakes import INFO_LINE

pytest.importorskip("atheris", reason="atheris is in the test extras (Linux x86-64 wheels)")

HARNESS = Path(__file__).with_name("atheris_decoders.py")
ROOT = Path(__file__).resolve().parents[2]
SECONDS = 6
"""Fuzzing time: ~13 000 inputs on a loaded 2-core host (cov ~360 edges from the seeds)."""
COMMAND_NAMES = sorted(COMMANDS)  # the harness's first control byte indexes this


def frame(packet: int, samples: int = 42) -> bytes:
    payload = np.arange(samples * 6, dtype="<f4").tobytes()
    return struct.pack("<5sHI", b"Data:", len(payload), packet) + payload


SEEDS: dict[str, tuple[str, bool, bytes]] = {
    "info": ("info", False, INFO_LINE),
    "voltage": ("getVoltage", False,
                b'Info:{"error":false,"cmd":"getVoltage","voltage":[230.1,229.8,231.0],'
                b'"unit":"V"}\r\n'),
    "frames": ("stop", True, frame(0) + b"Info:[I]03/02 10:42:24: 7999.87Hz, 80000s\r\n"
               + frame(1) + frame(3, 10)),
    "stop": ("stop", True, frame(0, 5) + b'Info:{"msg":"Received stop command",'
             b'"sample_duration":16157,"samples":16,"sent_samples":16,"start_ts":'
             b'"1614697441.119","stop_ts":"1614697457.276","ip":"192.168.0.138",'
             b'"avg_rate":0.955618,"cmd":"stop","error":false}\r\n'),
}


def test_atheris_finds_no_input_that_breaks_the_decoders_contract(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, (command, in_session, stream) in SEEDS.items():
        control = bytes([COMMAND_NAMES.index(command), int(in_session), 97])
        (corpus / name).write_bytes(control + stream)
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-max_total_time={SECONDS}", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/", "-rss_limit_mb=1024", str(corpus)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None and int(done[1]) > 1000, result.stderr[-1000:]
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("oom-*"))

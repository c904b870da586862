"""atheris (libFuzzer, coverage-guided) harness for the decoders and the reply parser.

Run as a script: ``python tests/reliability/atheris_decoders.py -runs=N [CORPUS_DIR]``; the
libFuzzer options apply (``-max_len``, ``-max_total_time``...).  Exit status 0 means no input
broke the contract; anything else prints the input that did.

The contract (issue 9, hostile input): whatever bytes a peer sends,

* the stream decoder (§2.3, §4.6) and the datagram decoder (§4.13) only emit events - they
  never raise - and the stream decoder's buffer stays within ``max_buffered_bytes``;
* every ``Reply`` it emits, parsed as the answer to any command, is a typed view or a
  ``ProtocolError``, never another exception.

The hypothesis tests (tests/protocol, test_reply_fuzz.py) explore by strategy; this one
follows coverage into the branches the strategies do not reach.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["smartmeter_ophyd.protocol"]):
    from smartmeter_ophyd.protocol import (
        COMMANDS,
        DatagramDecoder,
        ProtocolError,
        Reply,
        StreamDecoder,
        parse_reply,
    )

COMMAND_NAMES = sorted(COMMANDS)


def check_replies(events: list[object], expected: str) -> None:
    for event in events:
        if isinstance(event, Reply):
            try:
                repr(parse_reply(event, expected))
            except ProtocolError:
                pass


HEAD = 3
"""Control bytes before the stream: the command a reply answers, session on/off, where the
stream is cut into two reads (seeds are ``control + stream``, see :func:`seed`)."""


def seed(stream: bytes, command: str = "getVoltage", in_session: bool = True,
         cut: int = 0) -> bytes:
    """A corpus entry that decodes ``stream`` (fed in two reads split at ``cut``)."""
    return bytes([COMMAND_NAMES.index(command), int(in_session), cut % 256]) + stream


def one_input(data: bytes) -> None:
    if len(data) < HEAD:
        return
    expected = COMMAND_NAMES[data[0] % len(COMMAND_NAMES)]
    in_session = bool(data[1] & 1)
    stream = data[HEAD:]
    cuts = [data[2] * len(stream) // 256] if data[2] else []

    decoder = StreamDecoder(max_line_bytes=1024, max_payload_bytes=1024)
    if in_session:
        decoder.start_session(6, 1008)
    last = 0
    for cut in [*cuts, len(stream)]:  # the same bytes in pieces, as reads deliver them
        if cut <= last:
            continue  # b"" would mean EOF
        decoder.receive_data(stream[last:cut])
        last = cut
        check_replies(decoder.events(), expected)
        if decoder.buffered_bytes > decoder.max_buffered_bytes:
            raise AssertionError(f"{decoder.buffered_bytes} bytes buffered, above the bound "
                                 f"{decoder.max_buffered_bytes}")
    decoder.receive_data(b"")  # EOF
    check_replies(decoder.events(), expected)

    DatagramDecoder(6, 504).receive_datagram(stream)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

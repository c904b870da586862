"""Decode throughput of StreamDecoder on a steady 8 kHz x 6-channel stream.

Builds >= 50 MB of 1008-byte ``Data:`` frames interleaved with the firmware's per-second
rate log line (§4.7) and feeds it to :class:`StreamDecoder` in socket-sized pieces, draining
the events after each piece as a receive loop does.  The reference is
``numpy.frombuffer(payload, '<f4').copy()`` over the same number of payload bytes, measured in
the same run (best of N).  Target: ratio >= 0.5 at 256 KiB pieces.

Three piece sizes are reported: 256 KiB is what asyncio's selector transport hands a busy
client per ``recv`` (its read size), 64 KiB a smaller socket read loop, 16 KiB the smallest
read the client's ``SO_RCVLOWAT`` batching makes (there the per-read fixed cost dominates).

Run: ``.venv/bin/python benchmarks/decode.py [--mb 50] [--repeat 5] [--piece 262144 65536 16384]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from smartmeter_ophyd.protocol import (
    LogLevel,
    Samples,
    encode_frames,
    encode_log_line,
    encode_reply,
)
from smartmeter_ophyd.protocol._decoder import StreamDecoder

RATE = 8000
CHANNELS = 6
SAMPLES_PER_FRAME = 42  # 1008-byte chunks (§4.5)
TARGET_RATIO = 0.5


def build_stream(megabytes: float) -> tuple[bytes, int, int]:
    """The stream, its payload byte count and its sample count."""
    reply = encode_reply(
        {"error": False, "cmd": "sample", "measures": "v,i,v,i,v,i", "chunksize": 1008,
         "samplingrate": RATE, "conn_type": "TCP", "measurements": CHANNELS, "prefix": True}
    )  # fmt: skip
    frame_bytes = 11 + SAMPLES_PER_FRAME * CHANNELS * 4
    seconds = int(megabytes * 1e6 / (RATE / SAMPLES_PER_FRAME * frame_bytes)) + 1
    frames_per_second = RATE // SAMPLES_PER_FRAME  # 190 frames (+ remainder carried over)
    rng = np.random.default_rng(0)
    parts = [reply]
    packet = 0
    total_samples = 0
    for second in range(seconds):
        values = rng.standard_normal((frames_per_second * SAMPLES_PER_FRAME, CHANNELS)).astype(
            "<f4"
        )
        parts.append(encode_frames(packet, values, SAMPLES_PER_FRAME))
        packet += frames_per_second
        total_samples += values.shape[0]
        parts.append(
            encode_log_line(LogLevel.INFO, "03/02 10:42:24", f"7999.87Hz, {(second + 1) * RATE}s")
        )
    return b"".join(parts), total_samples * CHANNELS * 4, total_samples


def decode(pieces: list[bytes]) -> int:
    """Decode socket-sized pieces (cut beforehand: recv() hands the decoder fresh bytes)."""
    decoder = StreamDecoder()
    n = 0
    for data in pieces:
        decoder.receive_data(data)
        for event in decoder.events():
            if isinstance(event, Samples):
                n += event.n_samples
    decoder.receive_data(b"")
    for event in decoder.events():
        if isinstance(event, Samples):
            n += event.n_samples
    return n


def best_of(repeat: int, func: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="stream size in MB")
    parser.add_argument("--repeat", type=int, default=5, help="best of N")
    parser.add_argument(
        "--piece", type=int, nargs="+", default=[262144, 65536, 16384], help="bytes per receive_data"
    )
    args = parser.parse_args()

    stream, payload_bytes, total_samples = build_stream(args.mb)
    payload = np.random.default_rng(1).bytes(payload_bytes)
    mb = len(stream) / 1e6
    piece_lists = {
        piece: [stream[i : i + piece] for i in range(0, len(stream), piece)] for piece in args.piece
    }
    for pieces in piece_lists.values():
        decoded = decode(pieces)
        if decoded != total_samples:
            raise SystemExit(f"decoder delivered {decoded} of {total_samples} samples")

    # Decoder and reference alternate so both see the same machine load; the reference is
    # the best over the whole run (its speed depends on the allocator's state), which makes
    # every ratio conservative.
    t_decode = dict.fromkeys(piece_lists, float("inf"))
    t_numpy = float("inf")
    for _ in range(args.repeat):
        for piece, pieces in piece_lists.items():
            t_numpy = min(t_numpy, best_of(1, lambda: np.frombuffer(payload, "<f4").copy()))
            t_decode[piece] = min(t_decode[piece], best_of(1, lambda p=pieces: decode(p)))

    print(f"stream: {mb:.1f} MB ({payload_bytes / 1e6:.1f} MB payload, {total_samples} samples "
          f"= {total_samples / RATE:.0f} s at {RATE} Hz), best of {args.repeat}")  # fmt: skip
    print(f"numpy.frombuffer(payload).copy(): {payload_bytes / 1e6 / t_numpy:6.0f} MB/s payload "
          f"({t_numpy * 1e3:.1f} ms)")  # fmt: skip
    for piece, seconds in t_decode.items():
        ratio = t_numpy / seconds
        verdict = "meets" if ratio >= TARGET_RATIO else "MISSES"
        print(f"StreamDecoder, {piece // 1024:3d} KiB pieces: {mb / seconds:6.0f} MB/s stream, "
              f"{payload_bytes / 1e6 / seconds:6.0f} MB/s payload ({seconds * 1e3:.1f} ms, "
              f"{total_samples / RATE / seconds:.0f}x real time)")  # fmt: skip
        print(f"  ratio to numpy @ {piece // 1024} KiB pieces: {ratio:.2f}  "
              f"({verdict} target >= {TARGET_RATIO})")  # fmt: skip


if __name__ == "__main__":
    main()

"""A TCP proxy between a client and an emulated meter that can break the meter's stream.

The client talks to the proxy as if it were the meter; the proxy forwards both ways and
parses what the meter sends into its items (text lines and ``Data:`` frames, §2.3, §4.6), so
it can act on a frame boundary:

* :meth:`cut_next_frame` -- the next data frame is forwarded only up to half its payload,
  then both connections close (the link dies in the middle of a frame);
* :meth:`turn_hostile` -- from now on the meter's bytes are dropped and the client gets a
  ``Data:`` header declaring a huge payload followed by endless filler bytes.

What was forwarded is recorded (``frames``: packet number and payload bytes of every
complete frame), so a test can compare the client's account with what reached it.
Test-only; one client connection at a time.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time

HEADER = struct.Struct("<5sHI")  # "Data:", payload length, packet number (§4.6)
HOSTILE_LENGTH = 0xFFFF
FILLER = bytes(range(256)) * 256  # 64 KiB without "Data:"/"Info:" in it


class StreamProxy:
    def __init__(self, meter: tuple[str, int]) -> None:
        self.meter = meter
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = self._listener.getsockname()[:2]
        self.frames: list[tuple[int, int]] = []
        self.cut_frame: tuple[int, int, int] | None = None
        """(packet, payload bytes declared, payload bytes forwarded) of the frame cut."""
        self.hostile_bytes = 0
        self._cut = threading.Event()
        self._hostile = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-proxy", daemon=True)
        self._thread.start()

    def cut_next_frame(self) -> None:
        self._cut.set()

    def turn_hostile(self) -> None:
        self._hostile.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()

    # ------------------------------------------------------------------ the proxy thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with client, socket.create_connection(self.meter, timeout=5) as upstream:
                self._pump(client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        client.setblocking(False)
        upstream.setblocking(False)
        pending = bytearray()  # meter bytes not yet forwarded (an incomplete item)
        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                if self._hostile.is_set():
                    self._flood(client)
                for key, _ in sel.select(0.01):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        return
                    if key.data is not None:  # client -> meter: commands, as they are
                        with contextlib.suppress(OSError):
                            upstream.sendall(data)
                        continue
                    if self._hostile.is_set():
                        continue
                    pending += data
                    if not self._forward(client, pending):
                        return

    def _forward(self, client: socket.socket, pending: bytearray) -> bool:
        """Forward the complete items of ``pending``; False once the link is cut."""
        while pending:
            if pending.startswith(b"Data:"):
                if len(pending) < HEADER.size:
                    return True
                _, length, packet = HEADER.unpack_from(pending)
                if self._cut.is_set():
                    half = length // 2
                    self._send(client, bytes(pending[: HEADER.size + half])
                               if len(pending) >= HEADER.size + half else bytes(pending))
                    self.cut_frame = (packet, length, min(half, len(pending) - HEADER.size))
                    return False
                end = HEADER.size + length
                if len(pending) < end:
                    return True
                self.frames.append((packet, length))
            else:
                newline = pending.find(b"\n")
                if newline < 0:
                    return True
                end = newline + 1
            self._send(client, bytes(pending[:end]))
            del pending[:end]
        return True

    def _flood(self, client: socket.socket) -> None:
        if self.hostile_bytes == 0:
            self._send(client, HEADER.pack(b"Data:", HOSTILE_LENGTH, 0))
        try:
            self.hostile_bytes += client.send(FILLER)
        except (BlockingIOError, InterruptedError):
            time.sleep(0.005)
        except OSError:
            self._stop.set()

    @staticmethod
    def _send(client: socket.socket, data: bytes) -> None:
        client.setblocking(True)
        try:
            client.sendall(data)
        except OSError:
            pass
        finally:
            client.setblocking(False)

"""Sans-IO demuxer for the engines' multiplexed stdout/stderr stream.

Non-TTY logs, attach and exec output arrive as frames: an 8-byte header (stream id, three zero
bytes, big-endian uint32 length) then the payload. Network reads split frames anywhere, so the
demuxer keeps a buffer and is fed whatever bytes arrived; no I/O here, so it is tested alone.
"""

from __future__ import annotations

import enum
import struct

from gateway.engine.errors import StreamError

HEADER_SIZE = 8
_HEADER = struct.Struct(">BxxxL")


class Stream(enum.IntEnum):
    """Stream ids as the engines number them (3 = the engine's own error text)."""

    STDIN = 0
    STDOUT = 1
    STDERR = 2
    SYSTEMERR = 3


def encode_frame(stream: Stream | int, payload: bytes) -> bytes:
    """One frame as an engine writes it (for fakes and tests)."""
    return _HEADER.pack(int(stream), len(payload)) + payload


class FrameDemuxer:
    """Feed bytes in any split; get back complete `(Stream, payload)` frames in order."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Stream, bytes]]:
        """Add received bytes; return every frame they complete (empty frames are dropped)."""
        self._buf += data
        out: list[tuple[Stream, bytes]] = []
        while len(self._buf) >= HEADER_SIZE:
            head = bytes(self._buf[:HEADER_SIZE])
            if head[1:4] != b"\0\0\0" or head[0] > Stream.SYSTEMERR:
                raise StreamError(0, f"not a multiplexed stream (header {head.hex()})")
            stream_id, length = _HEADER.unpack(head)
            end = HEADER_SIZE + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER_SIZE:end])
            del self._buf[:end]
            if payload:
                out.append((Stream(stream_id), payload))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)

    def close(self) -> None:
        """The stream ended: a partial frame left over means output was cut off."""
        if self._buf:
            n = len(self._buf)
            self._buf.clear()
            raise StreamError(0, f"stream ended inside a frame ({n} bytes left over)")

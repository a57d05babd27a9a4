"""RFC 6455 for the fake WebSocket server: the handshake's accept key, frame headers, and a
reader of masked client frames. Stdlib only."""

from __future__ import annotations

import base64
import hashlib
import socket
import struct

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def frame_header(opcode: int, length: int) -> bytes:
    """The header of an unmasked, final server frame carrying `length` payload bytes."""
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length)
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


class FrameReader:
    """Reads masked client frames; keeps partial data across socket timeouts."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def _need(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = self._sock.recv(65536)  # may raise socket.timeout: the buffer is kept
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read(self) -> tuple[int, bytes] | None:
        """Next (opcode, payload), or None when the peer closed the socket."""
        if not self._need(2):
            return None
        b1, b2 = self._buffer[0], self._buffer[1]
        length = b2 & 0x7F
        offset = 2
        if length == 126:
            if not self._need(4):
                return None
            length = struct.unpack_from("!H", self._buffer, 2)[0]
            offset = 4
        elif length == 127:
            if not self._need(10):
                return None
            length = struct.unpack_from("!Q", self._buffer, 2)[0]
            offset = 10
        if not b2 & 0x80:
            raise ValueError("client frame not masked (RFC 6455 5.1)")
        if not self._need(offset + 4 + length):
            return None
        mask = bytes(self._buffer[offset:offset + 4])
        body = bytes(self._buffer[offset + 4:offset + 4 + length])
        del self._buffer[:offset + 4 + length]
        if not b1 & 0x80:
            raise ValueError("fragmented frames are not supported by the fake")
        repeated = (mask * (length // 4 + 1))[:length]
        payload = (int.from_bytes(body, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
        return b1 & 0x0F, payload

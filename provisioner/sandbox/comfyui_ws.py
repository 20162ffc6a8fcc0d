"""The stand-in ComfyUI's side of RFC 6455, written apart from the client's (`verify/ws.py`) so that
the client is tested against framing that is not its own.

Servers send unmasked frames and must receive masked ones (RFC 6455 §5.1); a client frame that is
not masked is a protocol error, answered with close code 1002, as aiohttp does.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
PROTOCOL_ERROR = 1002


class ProtocolError(Exception):
    """The client broke the framing rules (an unmasked frame)."""


class Closed(Exception):
    """The client went away mid-frame."""


def handshake_accept(client_key: str) -> str:
    return base64.b64encode(hashlib.sha1(client_key.strip().encode("ascii") + MAGIC).digest()).decode("ascii")


def frame(opcode: int, payload: bytes = b"") -> bytes:
    """One final, unmasked server frame."""
    size = len(payload)
    if size <= 125:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8"))


def receive(read: Callable[[int], bytes]) -> tuple[int, bytes]:
    """The next client message (continuations joined): (opcode, payload). `read(n)` returns at most
    n bytes, b"" at end of stream."""
    def exactly(n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            part = read(n - len(got))
            if not part:
                raise Closed("client closed the connection mid-frame")
            got += part
        return bytes(got)

    message, first = bytearray(), None
    while True:
        head, second = exactly(2)
        if not second & 0x80:
            raise ProtocolError("client frame not masked")
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", exactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", exactly(8))
        mask = exactly(4)
        data = bytes(b ^ mask[i & 3] for i, b in enumerate(exactly(size)))
        opcode = head & 0x0F
        if opcode >= OP_CLOSE:                     # control frames may come between fragments
            return opcode, data
        first = opcode if first is None else first
        message += data
        if head & 0x80:
            return first, bytes(message)

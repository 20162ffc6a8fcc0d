"""The stand-in ComfyUI's side of RFC 6455, written apart from the client's (`verify/ws.py`) so that
the client is tested against framing that is not its own.

Servers send unmasked, unfragmented frames. What they take is aiohttp 3.14's reading, checked
against real ComfyUI (tests/real/test_real_standin.py): a client frame need not be masked; reserved
bits, an unknown opcode, a fragmented or long control frame, a continuation out of place or an
invalid close code end the socket with 1002, text that is not UTF-8 with 1007.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

MAGIC = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
NORMAL, PROTOCOL_ERROR, INVALID_TEXT = 1000, 1002, 1007


class ProtocolError(Exception):
    """The client broke the framing rules: the close code the server answers with."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


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
    n bytes, b"" at end of stream. Raises ProtocolError for what aiohttp refuses."""
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
        opcode, final = head & 0x0F, bool(head & 0x80)
        if head & 0x70:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set")
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG):
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        size = second & 0x7F
        if opcode >= OP_CLOSE and (not final or size > 125):
            raise ProtocolError(PROTOCOL_ERROR, "control frame fragmented or longer than 125 bytes")
        if size == 126:
            (size,) = struct.unpack("!H", exactly(2))
        elif size == 127:
            (size,) = struct.unpack("!Q", exactly(8))
        mask = exactly(4) if second & 0x80 else b"\0\0\0\0"     # aiohttp takes unmasked frames too
        data = bytes(b ^ mask[i & 3] for i, b in enumerate(exactly(size)))
        if opcode == OP_CLOSE:
            if len(data) == 1 or len(data) >= 2 and not _valid_close(struct.unpack("!H", data[:2])[0]):
                raise ProtocolError(PROTOCOL_ERROR, "invalid close code")
            return opcode, data
        if opcode >= OP_CLOSE:                     # control frames may come between fragments
            return opcode, data
        if (opcode == OP_CONT) != (first is not None):
            raise ProtocolError(PROTOCOL_ERROR, "continuation frame out of place")
        first = opcode if first is None else first
        message += data
        if final:
            if first == OP_TEXT:
                try:
                    bytes(message).decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolError(INVALID_TEXT, "text is not UTF-8") from None
            return first, bytes(message)


def _valid_close(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or 3000 <= code < 5000

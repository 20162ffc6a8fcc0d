"""A minimal RFC 6455 websocket: a blocking client for ComfyUI's `/ws`; its stand-in reuses the codec.

ComfyUI's `/ws` only ever sends unfragmented text (JSON) and binary (preview) frames and expects
nothing back, so the subset here is small: handshake, frames up to 2**63 bytes, ping/pong, close.
"""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import struct
from typing import Any

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # fixed by RFC 6455 §1.3
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
FRAME_TIMEOUT_S = 30.0    # once a frame has started, its rest comes at once unless the link broke


class WebSocketClosed(ConnectionError):
    """The peer closed the websocket or the connection broke."""


def accept_key(key: str) -> str:
    """The `Sec-WebSocket-Accept` answer to a client's `Sec-WebSocket-Key`."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame; clients must mask (RFC 6455 §5.3), servers must not."""
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WebSocketClosed("connection closed mid-frame")
        buf += chunk
    return buf


def read_frame(sock: Any) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one frame read from anything with `recv(n)`; continuation
    frames are joined to their first."""
    opcode, data = -1, b""
    while True:
        b0, b1 = _exact(sock, 2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", _exact(sock, 2))[0]
        elif n == 127:
            n = struct.unpack(">Q", _exact(sock, 8))[0]
        key = _exact(sock, 4) if b1 & 0x80 else b""
        payload = _exact(sock, n)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        if b0 & 0x0F:
            opcode = b0 & 0x0F
        data += payload
        if b0 & 0x80:
            return opcode, data


class WebSocket:
    """A connected client websocket; `recv` answers pings itself and raises `WebSocketClosed` at the end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, host: str, port: int, path: str, *, timeout: float = 10.0) -> WebSocket:
        sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:          # read the answer byte by byte: no frame bytes swallowed
            byte = sock.recv(1)
            if not byte:
                sock.close()
                raise WebSocketClosed("closed during the handshake")
            head += byte
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept_key(key):
            sock.close()
            raise WebSocketClosed(f"no websocket upgrade: {lines[0]}")
        return cls(sock)

    def recv(self, timeout: float | None) -> str | bytes:
        """The next text (str) or binary (bytes) message; `TimeoutError` when none came in time."""
        while True:
            # Wait for the first byte with select, then read the frame whole: a timeout never
            # lands mid-frame, which would desynchronise the stream.
            if not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError("no websocket message in time")
            self.sock.settimeout(FRAME_TIMEOUT_S)
            try:
                opcode, data = read_frame(self.sock)
            except OSError as err:
                raise WebSocketClosed(str(err) or type(err).__name__) from None
            if opcode == TEXT:
                return data.decode("utf-8")
            if opcode == BINARY:
                return data
            if opcode == PING:
                self.sock.sendall(encode_frame(PONG, data, mask=True))
            elif opcode == CLOSE:
                raise WebSocketClosed("closed by the server")

    def close(self) -> None:
        try:
            self.sock.sendall(encode_frame(CLOSE, struct.pack(">H", 1000), mask=True))
        except OSError:
            pass
        self.sock.close()

"""A local port forward: listen on 127.0.0.1:0, relay each client to an upstream opened on demand.

The upstream is whatever the transport opens (an SSH `direct-tcpip` channel as channel.py's
`Upstream`, a plain socket); both have `fileno()` for select, `recv`, `sendall`, `shutdown`, `close`.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paramiko

Upstream = Any  # channel.Upstream or socket.socket: duck-typed, both select()able


@contextmanager
def forward(open_upstream: Callable[[tuple[str, int]], Upstream]) -> Iterator[int]:
    """Yield a local port; each connection to it is relayed to `open_upstream(client_address)`.

    Leaving the block closes the listener and every relay still open.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    live: set[Any] = set()
    lock = threading.Lock()
    closing = threading.Event()

    def serve() -> None:
        while not closing.is_set():
            try:
                client, addr = listener.accept()
            except OSError:
                return  # listener closed
            threading.Thread(target=relay, args=(client, addr), daemon=True).start()

    def relay(client: socket.socket, addr: tuple[str, int]) -> None:
        try:
            upstream = open_upstream(addr)
        except Exception:  # upstream refused: drop this client, like ssh -L does
            client.close()
            return
        with lock:
            live.update((client, upstream))
        try:
            _pump(client, upstream, closing)
        finally:
            with lock:
                live.difference_update((client, upstream))
            for end in (client, upstream):
                _quiet_close(end)

    thread = threading.Thread(target=serve, daemon=True, name="tunnel-accept")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        closing.set()
        try:  # wakes the blocked accept(); close() alone leaves the port listening on Linux
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        _quiet_close(listener)
        with lock:
            ends = list(live)
        for end in ends:
            _quiet_close(end)
        thread.join(timeout=2)


def _pump(a: Any, b: Any, closing: threading.Event) -> None:
    """Copy bytes both ways; an EOF on one side is passed on as a half-close, like `ssh -L`."""
    open_ends = [a, b]
    try:
        while open_ends and not closing.is_set():
            readable, _, _ = select.select(open_ends, [], [], 0.5)
            for src in readable:
                dst = b if src is a else a
                data = src.recv(65536)
                if data:
                    dst.sendall(data)
                else:
                    open_ends.remove(src)
                    dst.shutdown(socket.SHUT_WR)
    except (OSError, EOFError, paramiko.SSHException):
        return  # a side reset or the transport died: the caller closes both ends


def _quiet_close(end: Any) -> None:
    try:
        end.close()
    except (OSError, EOFError, paramiko.SSHException):  # closing a channel of a dying transport
        pass

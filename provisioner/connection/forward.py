"""A local port forward: listen on 127.0.0.1:0, relay each client to an upstream opened on demand.

The upstream is whatever the transport opens (an SSH `direct-tcpip` channel as channel.py's
`Upstream`, a plain socket); both have `recv`, `sendall`, `shutdown`, `close`. Each direction is
copied by a thread of its own with blocking reads, never by `select`: a paramiko channel is made
selectable by a pipe (`Channel.fileno()`) that `close()` closes while the transport's thread may
still be writing a byte into it for data just arrived, and that write's EBADF, raised inside the
transport's thread, ends the whole connection ("Socket exception: Bad file descriptor"): every
later command on the host failed, mid-verification.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import paramiko

Upstream = Any  # channel.Upstream or socket.socket: duck-typed


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
        _quiet_close(listener)      # its shutdown wakes the blocked accept()
        with lock:
            ends = list(live)
        for end in ends:
            _quiet_close(end)
        thread.join(timeout=2)


def _pump(a: Any, b: Any, closing: threading.Event) -> None:
    """Copy bytes both ways until both sides ended; an EOF on one side is passed on as a
    half-close, like `ssh -L`. Leaving the tunnel shuts both ends, which ends the blocked reads."""
    back = threading.Thread(target=_copy, args=(b, a, closing), daemon=True, name="tunnel-back")
    back.start()
    _copy(a, b, closing)
    back.join()


def _copy(src: Any, dst: Any, closing: threading.Event) -> None:
    try:
        while not closing.is_set() and (data := src.recv(65536)):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except (OSError, EOFError, paramiko.SSHException):
        return  # a side reset, or the transport died: the caller closes both ends


def _quiet_close(end: Any) -> None:
    """Shut, then close: a thread blocked reading a socket wakes only on shutdown (close alone
    leaves it waiting on Linux); a channel's close wakes its reader itself."""
    for call in (lambda: end.shutdown(socket.SHUT_RDWR), end.close):
        try:
            call()
        except (OSError, EOFError, paramiko.SSHException):  # already gone, or a dying transport's channel
            pass

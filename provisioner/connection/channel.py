"""A channel's data and EOF, sent only while it is open.

paramiko builds a channel's data or EOF message under the channel's lock, then sends it after
letting go; a CLOSE sent in between (ours, or paramiko's answer to the server's when the command
ended) goes out first. OpenSSH answers data or EOF for a channel it has freed by dropping the whole
connection ("data packet referred to nonexistent channel"), so every later command on the host
failed with "SSH session not active" (paramiko issues #1115 and #1705, open upstream). Here the
last check and the write happen under the transport's send lock, which every CLOSE goes through
after its channel is marked closed: what is open at the write precedes the CLOSE on the wire.
"""

from __future__ import annotations

import socket

import paramiko
from paramiko.common import cMSG_CHANNEL_DATA


def send_all(chan: paramiko.Channel, data: bytes) -> None:
    """Channel.sendall, minus the race; OSError once the channel is closed."""
    view = memoryview(data)
    while view:
        with chan.lock:
            if chan.closed:
                raise OSError("the channel is closed")
            size = chan._wait_for_send_window(len(view))     # waits, releasing the lock
            if size == 0:                                     # closed or EOF sent meanwhile
                raise OSError("the channel is closed")
            message = paramiko.Message()
            message.add_byte(cMSG_CHANNEL_DATA)
            message.add_int(chan.remote_chanid)
            message.add_string(bytes(view[:size]))
        if not send_if_open(chan, message):
            raise OSError("the channel is closed")
        view = view[size:]


def send_eof(chan: paramiko.Channel) -> None:
    """Channel.shutdown_write, minus the race; nothing once the channel is closed."""
    with chan.lock:
        message = None if chan.closed else chan._send_eof()  # None: EOF already sent
    if message is not None:
        send_if_open(chan, message)


def send_if_open(chan: paramiko.Channel, message: paramiko.Message) -> bool:
    """Transport._send_user_message (it waits out a key exchange), with the channel's state read
    under the same lock as the write; False: closed before its turn came, not sent."""
    transport = chan.transport
    while True:
        transport.clear_to_send.wait(0.1)
        if not transport.active:
            return False
        with transport.clear_to_send_lock:
            if transport.clear_to_send.is_set():
                if chan.closed:
                    return False
                transport._send_message(message)
                return True


class Upstream:
    """A `direct-tcpip` channel as forward.py's relay drives it (a socket's calls it uses)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def recv(self, size: int) -> bytes:
        return self.chan.recv(size)

    def sendall(self, data: bytes) -> None:
        send_all(self.chan, data)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            send_eof(self.chan)

    def close(self) -> None:
        self.chan.close()

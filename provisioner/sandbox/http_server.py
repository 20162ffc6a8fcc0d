"""The stand-ins' HTTP server: the standard library's, with a real server's listen backlog."""

from __future__ import annotations

from http.server import ThreadingHTTPServer


class StandInServer(ThreadingHTTPServer):
    """socketserver listens with a backlog of 5: ten hosts fetching at once on a loaded machine
    overflowed it and clients saw "Connection reset by peer", which the real Hub and GitHub never
    send for that. A thread per request, none outliving the server."""

    request_queue_size = 128
    daemon_threads = True

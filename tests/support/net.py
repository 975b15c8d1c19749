"""Loopback ports for test servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago.

    Bind-then-close: another process may take the port before the caller binds it. Use it only
    where the server cannot be started on port 0 and report the port it got.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

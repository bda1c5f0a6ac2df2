"""systemd's readiness protocol (sd_notify): datagrams to $NOTIFY_SOCKET, if set.

Written here because it is a dozen lines; a missing or broken socket is ignored
(notifications are advisory).
"""
from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Sends e.g. ``READY=1`` or ``STATUS=...``; returns whether it went out."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False

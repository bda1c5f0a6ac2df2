"""Where the daemon listens by default, and how long a call may take; shared by the daemon and the client."""
from __future__ import annotations

import os

ENV_SOCKET = "VATTND_SOCKET"
# Seconds every call of a worker's session may take.
DEFAULT_TIMEOUT_S = 30.0


def default_socket() -> str:
    """``$VATTND_SOCKET``, else ``$XDG_RUNTIME_DIR/vattnd/vattnd.sock``, else ``/run/vattnd/vattnd.sock``."""
    explicit = os.environ.get(ENV_SOCKET)
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "vattnd", "vattnd.sock")
    return "/run/vattnd/vattnd.sock"


def channel_path(socket_path: str) -> str:
    """The fd channel listens beside the gRPC socket."""
    return socket_path + ".fd"


def admin_path(socket_path: str) -> str:
    """The admin service (Admin in vattn.proto) listens beside the gRPC socket."""
    return socket_path + ".admin"

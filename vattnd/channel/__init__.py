"""The Unix-socket fd channel: one connection = one session; calls, replies and page fds."""
from vattnd.channel.server import ChannelServer, Connection

__all__ = ["ChannelServer", "Connection"]

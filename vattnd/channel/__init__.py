"""The Unix-socket fd channel (one connection = one session)."""
from vattnd.channel.server import ChannelBroken, ChannelServer, Connection

__all__ = ["ChannelBroken", "ChannelServer", "Connection"]

"""vattnd: a node daemon that owns KV-cache memory and maps it into workers."""

__version__ = "0.1.0"

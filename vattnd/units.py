"""Byte sizes (defined in :mod:`vattn.contract.units`, shared with the client)."""
from vattn.contract.units import format_size, parse_size

__all__ = ["format_size", "parse_size"]

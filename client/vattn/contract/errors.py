"""Typed errors of the vattn API, shared by the daemon and the client.

Each class stands for one gRPC status code. The daemon's pool core raises
them, both transports turn them into that status with the message, and the
client turns a status back into the same class, so a worker can write
``except vattn.ResourceExhausted``. Part of the contract layer: no grpc, no torch.
"""
from __future__ import annotations


class VattnError(Exception):
    """Base of every error vattn raises. ``code`` is the gRPC status name."""

    code = "UNKNOWN"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(VattnError):
    """The request is malformed: fix the argument named in the message."""

    code = "INVALID_ARGUMENT"


class Unauthenticated(VattnError):
    """The session token is unknown or its session has ended: reconnect."""

    code = "UNAUTHENTICATED"


class NotFound(VattnError):
    """The region named does not exist (any more)."""

    code = "NOT_FOUND"


class PermissionDenied(VattnError):
    """The region belongs to another session."""

    code = "PERMISSION_DENIED"


class OutOfRange(VattnError):
    """A slot index or token count is outside the region's geometry."""

    code = "OUT_OF_RANGE"


class ResourceExhausted(VattnError):
    """The pool has too few free pages for the request."""

    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(VattnError):
    """The object is not in a state that allows the call (see :class:`Closed`)."""

    code = "FAILED_PRECONDITION"


class Closed(FailedPrecondition):
    """The pool, session or cache was closed; the message names which. Connect again to go on."""


class Unavailable(VattnError):
    """The daemon cannot be reached, is shutting down, or the channel broke."""

    code = "UNAVAILABLE"


class Internal(VattnError):
    """The daemon hit a bug or a backend failure; its log says more."""

    code = "INTERNAL"


ERRORS_BY_CODE: dict[str, type[VattnError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        Unauthenticated,
        NotFound,
        PermissionDenied,
        OutOfRange,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        Internal,
    )
}


def error_for(code: str, message: str) -> VattnError:
    """The typed error for a status code name and its message (VattnError for an unknown code)."""
    cls = ERRORS_BY_CODE.get(code)
    return cls(message) if cls is not None else VattnError(f"{code}: {message}")


__all__ = [
    "ERRORS_BY_CODE", "Closed", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound", "OutOfRange",
    "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable", "VattnError", "error_for",
]

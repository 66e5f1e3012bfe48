"""Typed errors: every failed call raises a SarathiError subclass that carries the gRPC status."""

from __future__ import annotations

import grpc


class SarathiError(Exception):
    """A call failed with a gRPC status. `code` is the grpc.StatusCode, `code_name` its name
    (e.g. "DEADLINE_EXCEEDED"), `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @property
    def code_name(self) -> str:
        return self.code.name


class InvalidArgument(SarathiError):
    """A bad prompt or sampling parameter (not retryable)."""


class ResourceExhausted(SarathiError):
    """The request can never fit the KV cache, or too many are in flight."""


class Unavailable(SarathiError):
    """No server answers at the address, or its worker is loading or gone."""


class DeadlineExceeded(SarathiError):
    """The call's deadline passed; the server aborted the request and freed its blocks."""


class Cancelled(SarathiError):
    """The call was cancelled."""


class Unauthenticated(SarathiError):
    """A missing or wrong token."""


class PermissionDenied(SarathiError):
    """The token is valid but may not make this call."""


class Internal(SarathiError):
    """A server-side bug (INTERNAL or UNKNOWN)."""


_BY_CODE: dict[grpc.StatusCode, type[SarathiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNKNOWN: Internal,
}


def error_for(code: grpc.StatusCode, details: str) -> SarathiError:
    return _BY_CODE.get(code, SarathiError)(code, details)


def from_rpc_error(error: grpc.RpcError) -> SarathiError:
    """The typed error for a failed call (sync or asyncio)."""
    return error_for(error.code(), error.details() or "")

"""The service's domain errors and the one place they become gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio


class FieldError(ValueError):
    """Input that fails validation; ``field`` names the offending field, the message the value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class OverLimit(FieldError):
    """Accepting this input would exceed a server limit on held bytes; ``field`` names it."""


class JobConflict(Exception):
    """A job id is already registered with a different spec."""


class JobLimit(Exception):
    """Registering one more job (or a job this large) would exceed the server's caps."""


class RankBound(Exception):
    """A (job, rank) is already bound to another open stream."""


class StaleGeneration(Exception):
    """A stream or report belongs to an earlier registration of its job id."""


class NotOwner(Exception):
    """With jobs bound to client certificates: the caller's certificate is not the job's."""


class NotEnoughData(Exception):
    """The expert window cannot support a fit and a held-out evaluation (the message says why)."""


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
                ) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # it always raises; tells type checkers so


def status_of(err: Exception) -> grpc.StatusCode:
    """The status code a domain error maps to (see the service comments in placement.proto)."""
    if isinstance(err, RankBound):
        return grpc.StatusCode.ABORTED  # retryable: a reconnecting worker's old stream may linger
    if isinstance(err, JobConflict):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(err, (JobLimit, OverLimit)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(err, NotOwner):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, (NotEnoughData, StaleGeneration)):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INVALID_ARGUMENT

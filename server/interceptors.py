"""Server interceptors. Metrics: started / handled-by-code / handling-seconds per RPC method.
Strict parsing: malformed request bytes are INVALID_ARGUMENT. (Authentication: ``security``.)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from .metrics import Metrics


def _kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _split(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_of(context: grpc.aio.ServicerContext, err: BaseException | None) -> grpc.StatusCode:
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if err is None else grpc.StatusCode.UNKNOWN


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """The same kind of handler with its behavior passed through wrap."""
    ser = {"request_deserializer": request_deserializer,
           "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **ser)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **ser)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC into ``Metrics`` (go-grpc-prometheus names and labels)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        labels = (_kind(handler), *_split(handler_call_details.method))
        m = self._metrics

        def finish(context: grpc.aio.ServicerContext, start: float, err: BaseException | None):
            m.grpc_handled.labels(*labels, _code_of(context, err).name).inc()
            m.grpc_seconds.labels(*labels).observe(time.perf_counter() - start)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):
                async def gen_wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    m.grpc_started.labels(*labels).inc()
                    start, err = time.perf_counter(), None
                    try:
                        async for item in behavior(request, context):
                            yield item
                    except BaseException as e:
                        err = e
                        raise
                    finally:
                        finish(context, start, err)
                return gen_wrapper

            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                m.grpc_started.labels(*labels).inc()
                start, err = time.perf_counter(), None
                try:
                    return await behavior(request, context)
                except BaseException as e:
                    err = e
                    raise
                finally:
                    finish(context, start, err)
            return wrapper

        return rewrap(handler, wrap, handler.request_deserializer)


class MalformedRequest(ValueError):
    """Request bytes that do not parse as the method's message type."""


def _strict(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as err:  # DecodeError, or whatever a message parser raises
            raise MalformedRequest(f"malformed request: {err}") from None
    return parse


class StrictParsingInterceptor(grpc.aio.ServerInterceptor):
    """Request bytes that do not parse get INVALID_ARGUMENT naming the message type.

    Left to gRPC, they get UNKNOWN ("Unexpected DecodeError") and an ERROR log with a traceback
    per call, so random bytes from any client could flood the logs. Request streams yield
    MalformedRequest from their iterator; handlers that consume it in another task (the
    placement Stream) catch it themselves.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _strict(handler.request_deserializer)

        async def parsed(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raw_iterator:
                # Hold neither the bytes nor the message while suspended: a stream sends one
                # report a round, and each of its messages would stay alive until the next.
                box = [parse(raw)]
                raw = None
                yield box.pop()

        def request_of(raw: Any) -> Any:
            return parsed(raw) if handler.request_streaming else parse(raw)

        def wrap(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):
                async def gen_wrapper(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                    try:
                        async for item in behavior(request_of(raw), context):
                            yield item
                    except MalformedRequest as err:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                return gen_wrapper

            async def wrapper(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behavior(request_of(raw), context)
                except MalformedRequest as err:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            return wrapper

        return rewrap(handler, wrap, None)

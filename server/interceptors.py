"""Server interceptors. Metrics: started / handled-by-code / handling-seconds per RPC method.

Other cross-cutting concerns (authentication) slot in as further interceptors passed to
``app.PlacementServer``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
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

        ser = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream), **ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **ser)
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **ser)

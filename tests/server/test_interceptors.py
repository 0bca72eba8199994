"""The server interceptors on a real grpc.aio server with a small echo service of every RPC kind:
metrics count every call by kind, method and code; malformed request bytes are INVALID_ARGUMENT
for unary and streaming requests alike, and the handler never sees them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import grpc.aio
import pytest

from netmoe.server.interceptors import MetricsInterceptor, StrictParsingInterceptor
from netmoe.server.metrics import Metrics

SERVICE = "test.Echo"


def _parse(raw: bytes) -> bytes:
    if raw.startswith(b"bad"):
        raise ValueError("not an echo message")
    return raw


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"deny":
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied")
    return request


async def _unary_stream(request: bytes, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield request


async def _stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                        ) -> bytes:
    return b"".join([r async for r in requests])


async def _stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary, _parse, bytes),
    "UnaryStream": grpc.unary_stream_rpc_method_handler(_unary_stream, _parse, bytes),
    "StreamUnary": grpc.stream_unary_rpc_method_handler(_stream_unary, _parse, bytes),
    "StreamStream": grpc.stream_stream_rpc_method_handler(_stream_stream, _parse, bytes),
}


@pytest.fixture
def echo() -> Iterator[tuple[grpc.Channel, Metrics]]:
    metrics = Metrics()
    loop = asyncio.new_event_loop()
    ready: list[int] = []
    started, stop = threading.Event(), asyncio.Event()

    async def main() -> None:
        server = grpc.aio.server(
            interceptors=[MetricsInterceptor(metrics), StrictParsingInterceptor()])
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
        ready.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        started.set()
        await stop.wait()
        await server.stop(1)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    channel = grpc.insecure_channel(f"127.0.0.1:{ready[0]}")
    try:
        yield channel, metrics
    finally:
        channel.close()
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def _handled(metrics: Metrics, kind: str, method: str, code: str) -> float:
    """The count, once the server has finished the calls the client already saw end (the
    client may see a call's status before the server's handler returns)."""
    counter = metrics.grpc_handled.labels(kind, SERVICE, method, code)
    deadline = time.monotonic() + 5
    while counter._value.get() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return counter._value.get()


def test_every_kind_is_counted_by_code(echo: tuple[grpc.Channel, Metrics]) -> None:
    channel, metrics = echo
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    assert unary(b"hi", timeout=5) == b"hi"
    with pytest.raises(grpc.RpcError) as info:
        unary(b"deny", timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(channel.unary_stream(f"/{SERVICE}/UnaryStream")(b"x", timeout=5)) == [b"x"] * 2
    assert channel.stream_unary(f"/{SERVICE}/StreamUnary")(iter([b"a", b"b"]), timeout=5) == b"ab"
    got = list(channel.stream_stream(f"/{SERVICE}/StreamStream")(iter([b"c", b"d"]), timeout=5))
    assert got == [b"c", b"d"]
    assert _handled(metrics, "unary", "Unary", "OK") == 1
    assert _handled(metrics, "unary", "Unary", "PERMISSION_DENIED") == 1
    assert _handled(metrics, "server_stream", "UnaryStream", "OK") == 1
    assert _handled(metrics, "client_stream", "StreamUnary", "OK") == 1
    assert _handled(metrics, "bidi_stream", "StreamStream", "OK") == 1
    assert metrics.grpc_started.labels("unary", SERVICE, "Unary")._value.get() == 2


@pytest.mark.parametrize("method", ["Unary", "UnaryStream", "StreamUnary", "StreamStream"])
def test_malformed_bytes_are_invalid_argument(echo: tuple[grpc.Channel, Metrics],
                                              method: str) -> None:
    channel, metrics = echo
    kind = {"Unary": "unary_unary", "UnaryStream": "unary_stream",
            "StreamUnary": "stream_unary", "StreamStream": "stream_stream"}[method]
    call = getattr(channel, kind)(f"/{SERVICE}/{method}")
    request = iter([b"ok", b"bad bytes"]) if method.startswith("Stream") else b"bad bytes"
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=5)
        if method.endswith("Stream"):
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request: not an echo message" in info.value.details()
    labels = {"Unary": "unary", "UnaryStream": "server_stream", "StreamUnary": "client_stream",
              "StreamStream": "bidi_stream"}[method]
    assert _handled(metrics, labels, method, "INVALID_ARGUMENT") == 1

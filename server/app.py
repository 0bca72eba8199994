"""Server lifecycle: grpc.aio server, health, reflection, metrics endpoint, graceful drain.

Two ways to run it:
- ``serve(config)`` blocks in the calling thread until SIGTERM / SIGINT, then drains and exits
  (``netmoe serve``).
- ``start(config) -> ServerHandle`` runs it on its own event loop in a daemon thread, for
  embedding in another process (demo, tests); port 0 picks an ephemeral port.

Draining: health turns NOT_SERVING for ``drain_seconds`` (probes and load balancers see it while
RPCs are still served), then the server stops accepting RPCs and gives open ones ``grace_seconds``;
rounds still waiting are answered with home-placement fallbacks before the streams close.
Authentication (bearer token) and TLS come from the config (see ``security``); further
``interceptors`` and explicit ``credentials`` can be passed in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc

from . import security
from .advisor import ExpertAdvisors, WindowLimits
from .config import ServerConfig
from .interceptors import MetricsInterceptor, StrictParsingInterceptor
from .metrics import Metrics
from .rounds import Coordinator, SolveFn
from .servicer import PlacementServicer, StreamLimits

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PlacementService"].full_name


class PortUnavailable(ValueError):
    """A configured port cannot be listened on (taken by another process, or not local)."""


def _unavailable(field: str, host: str, port: int, why: str) -> PortUnavailable:
    flag = "--" + field.replace("_", "-")
    return PortUnavailable(f"{flag} {port}: cannot listen on {host}:{port}: {why}")


def check_port_free(field: str, host: str, port: int) -> None:
    """Raises PortUnavailable when another socket listens on host:port (port 0: any free port).
    gRPC's own bind failure comes with a C-core log line and no reason, hence this probe."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise _unavailable(field, host, port, err.strerror) from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                why = ("another process listens there" if err.errno == errno.EADDRINUSE
                       else err.strerror)
                raise _unavailable(field, host, port, why) from None


class PlacementServer:
    """One service instance; create, ``await start()``, ``await drain()`` on one event loop."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        solve_fn: SolveFn | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        kwargs = {} if solve_fn is None else {"solve_fn": solve_fn}
        self._coordinator_args = dict(
            solver_threads=config.solver_threads, process_rows=config.process_solve_rows,
            max_jobs=config.max_jobs,
            max_pending=config.max_pending_rounds, finished_memory=config.finished_memory,
            max_world_size=config.max_world_size, max_report_cells=config.max_report_cells,
            max_job_pending_bytes=config.max_job_pending_bytes,
            max_pending_bytes=config.max_pending_bytes, observer=self.metrics, **kwargs,
        )
        self.advisors = ExpertAdvisors(
            WindowLimits(config.expert_window_steps, config.expert_window_bytes,
                         max_starts=config.expert_max_starts,
                         max_confirmed_bytes=config.expert_confirmed_bytes),
            observer=self.metrics)
        # Metrics first: rejected (UNAUTHENTICATED, malformed) calls are counted too; parsing
        # after authentication, so unauthenticated callers never reach a parser.
        self._interceptors = [
            MetricsInterceptor(self.metrics), *security.interceptors(config),
            StrictParsingInterceptor(), *interceptors,
        ]
        self._credentials = (
            credentials if credentials is not None else security.server_credentials(config)
        )
        self.coordinator: Coordinator | None = None
        self.health: HealthServicer | None = None
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        self.coordinator = Coordinator(**self._coordinator_args, hooks=self.advisors)
        coordinator = self.coordinator
        self.metrics.pending_bytes.set_function(lambda: coordinator.pending_bytes)
        server = grpc.aio.server(interceptors=self._interceptors, options=cfg.grpc_options())
        placement_pb2_grpc.add_PlacementServiceServicer_to_server(
            PlacementServicer(self.coordinator, self.advisors, self.metrics, StreamLimits(
                cfg.stream_backlog_bytes, cfg.max_streams, cfg.stream_idle_seconds),
                security.JobOwners() if cfg.bind_jobs_to_certs else None), server
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            server,
        )
        metrics_host = cfg.metrics_host or cfg.host
        check_port_free("port", cfg.host, cfg.port)
        if cfg.metrics_port is not None:
            check_port_free("metrics_port", metrics_host, cfg.metrics_port)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if self._credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self._credentials)
        except RuntimeError:  # taken between the probe and here
            raise _unavailable("port", cfg.host, cfg.port, "gRPC failed to bind it") from None
        if cfg.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve_http(metrics_host, cfg.metrics_port)
            except OSError as err:
                await server.stop(None)
                raise _unavailable("metrics_port", metrics_host, cfg.metrics_port,
                                   err.strerror or str(err)) from None
        await server.start()
        self._server = server
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "netmoe serve: gRPC on %s:%d (%s), %s", cfg.host, self.port,
            "TLS" if self._credentials else "plaintext",
            f"metrics on http://{metrics_host}:{self.metrics_port}/metrics"
            if self.metrics_port is not None else "metrics disabled",
        )
        log.info("netmoe serve: authentication: %s", security.describe(cfg))
        security.warn_if_exposed(cfg)

    async def drain(self) -> None:
        """NOT_SERVING, wait drain_seconds, stop accepting, grace for open RPCs, then stop."""
        if self._server is None or self._stopped.is_set():
            return
        assert self.health is not None and self.coordinator is not None
        log.info("netmoe serve: draining (health NOT_SERVING)")
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.config.drain_seconds)
        stopping = asyncio.ensure_future(self._server.stop(self.config.grace_seconds))
        # The metrics server notices a shutdown only at its next poll (up to 0.5 s): in the
        # grace period, not after it.
        http = asyncio.ensure_future(asyncio.to_thread(self.metrics.stop_http))
        # Answer every waiting rank now so open streams can end cleanly within the grace period.
        self.coordinator.close()
        self.advisors.close()
        await asyncio.gather(stopping, http)
        self._stopped.set()
        log.info("netmoe serve: stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


class ServerHandle:
    """A PlacementServer running on its own event loop in a daemon thread."""

    def __init__(self, server: PlacementServer, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.server = server
        self._loop = loop
        self._thread = thread

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        """Drains (as on SIGTERM) and joins the thread. Idempotent."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.drain(), self._loop).result(timeout)
            self._thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    config: ServerConfig,
    *,
    solve_fn: SolveFn | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
    timeout: float = 30.0,
) -> ServerHandle:
    """Starts a server in a background thread; returns once it listens (raises if it cannot)."""
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[PlacementServer] = concurrent.futures.Future()

    async def main() -> None:
        # Built on the server's loop: grpc.aio objects belong to the loop that creates them.
        try:
            server = PlacementServer(config, solve_fn=solve_fn, interceptors=interceptors,
                                     credentials=credentials)
            await server.start()
        except BaseException as err:
            ready.set_exception(err)
            return
        ready.set_result(server)
        await server.wait_stopped()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="netmoe-server", daemon=True)
    thread.start()
    try:
        server = ready.result(timeout)
    except BaseException:
        thread.join(timeout)
        raise
    return ServerHandle(server, loop, thread)


def serve(config: ServerConfig, **kwargs: object) -> NoReturn:
    """Runs until SIGTERM or SIGINT, then drains and ends the process: exit code 0 after SIGTERM
    (an orderly stop), 130 after SIGINT (Ctrl-C, as shells report an interrupted command)."""
    signals: list[signal.Signals] = []
    servers: list[PlacementServer] = []

    async def main() -> None:
        server = PlacementServer(config, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        loop = asyncio.get_running_loop()
        draining: list[asyncio.Task[None]] = []

        def on_signal(sig: signal.Signals) -> None:
            log.info("netmoe serve: got %s", sig.name)
            signals.append(sig)
            if not draining:
                draining.append(loop.create_task(server.drain()))

        # Before start: a signal right after the startup log line must drain, not kill.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await server.start()
        if draining:  # the signal came while starting, when there was nothing to drain yet
            await server.drain()
        await server.wait_stopped()

    asyncio.run(main())
    code = 130 if signals[:1] == [signal.SIGINT] else 0
    coord = servers[0].coordinator if servers else None
    if coord is not None and coord.solving:
        log.info("netmoe serve: exiting with %d solve(s) abandoned", coord.solving)
    # Drained: every RPC ended, every waiting rank answered. Exit now, as drain + grace
    # promised: interpreter teardown (OR-Tools, gRPC) takes up to a second on a busy machine
    # and would wait for native solver threads still running an abandoned solve.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

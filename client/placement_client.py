"""gRPC client of the placement service, as one training rank uses it.

One bidirectional stream per rank carries a Report per round (step, micro-batch, layer) and brings
back the Plan of that round. A background thread owns the stream: it registers the job
(idempotent), opens the stream, matches incoming plans to pending futures by round, and on a
transient failure fails the pending futures and reconnects with exponential backoff, logging
one line per state change (lost; still unreachable, every ``NOTICE_SECONDS``; back). A rejection
that retrying cannot cure (the job id registered with another spec, a bad spec, a wrong token) is
logged once and ends the thread: every later round falls back at once with that reason
(``rejected``). ``submit`` never blocks and never raises for service trouble (it returns a failed
future); wrong shapes do raise ValueError. ``job_spec`` builds the job's spec from plain numbers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

from netmoe.client.planning import NoPlan
from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import (
    copies_to_proto,
    job_spec,
    maps_to_proto,
    plan_from_proto,
    report_to_proto,
    tables_to_proto,
)
from netmoe.round import INVALID, RankPlan, RoundCounts, RoundKey

__all__ = ["PlacementClient", "channel_to", "job_spec"]

log = logging.getLogger(__name__)

# While the service stays unreachable, one reminder line per this many seconds.
NOTICE_SECONDS = 60.0

# Rejections that no retry can cure: reconnecting would only repeat them.
_FATAL = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS,
          grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _read(path: str | None) -> bytes | None:
    return None if not path else Path(path).read_bytes()


def channel_to(
    address: str,
    *,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> grpc.Channel:
    """A channel to the service: TLS when a CA bundle (PEM path) is given, with a client
    certificate and key (PEM paths) for mutual TLS; plaintext otherwise."""
    if not tls_ca:
        if tls_cert or tls_key:
            raise ValueError("tls_cert and tls_key need tls_ca (the CA that signed the server)")
        return grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    if bool(tls_cert) != bool(tls_key):
        raise ValueError(f"mutual TLS needs both tls_cert and tls_key, got {tls_cert=} {tls_key=}")
    creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
    return grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)


class PlacementClient:
    """A rank's connection to the placement service; a ``PlanSource``.

    ranks: for a node's first rank reporting for its node (``netmoe.client.node_reports``), the
    node's ranks of its group, ``rank`` first: every report is then a node report of their rows
    and every plan answers them all; () for the rank alone.
    token: the service's shared token (sent as ``authorization: Bearer TOKEN``), default
    $NETMOE_AUTH_TOKEN. tls_ca / tls_cert / tls_key: PEM paths, default $NETMOE_TLS_CA /
    $NETMOE_TLS_CLIENT_CERT / $NETMOE_TLS_CLIENT_KEY (see ``channel_to``).
    """

    def __init__(
        self,
        address: str,
        job: str,
        rank: int,
        spec: pb.JobSpec,
        *,
        ranks: Sequence[int] = (),
        connect_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.05, 2.0),
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        self.address, self.job, self.rank, self.spec = address, job, rank, spec
        if ranks and ranks[0] != rank:
            raise ValueError(f"ranks must start with rank {rank}, got {list(ranks)}")
        self.ranks = tuple(int(r) for r in ranks)
        self._generation = 0  # of the job's registration this client made (reports carry it)
        token = token if token is not None else os.environ.get("NETMOE_AUTH_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.experts = spec.topology.experts
        # Columns of a report: routes per device for a device_counts job, else per expert.
        self.device_counts = spec.device_counts
        self._columns = spec.world_size if spec.device_counts else self.experts
        self.reconnects = 0
        self._lost: tuple[float, float] | None = None  # (since, last notice) while unreachable
        self.rejected = ""  # why the service refused the job for good ("" while it has not)
        self._backoff = backoff
        self._lock = threading.Lock()
        self._pending: dict[RoundKey, Future[RankPlan | None]] = {}
        self._requests: queue.SimpleQueue[pb.Report | None] | None = None
        self._call: Any = None
        self._closed = threading.Event()
        self._connected = threading.Event()
        self._settled = threading.Event()  # connected once, or rejected for good
        env = os.environ.get
        self._channel = channel_to(
            address,
            tls_ca=tls_ca or env("NETMOE_TLS_CA"),
            tls_cert=tls_cert or env("NETMOE_TLS_CLIENT_CERT"),
            tls_key=tls_key or env("NETMOE_TLS_CLIENT_KEY"),
        )
        self._stub = placement_pb2_grpc.PlacementServiceStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="netmoe-placement", daemon=True)
        self._thread.start()
        # Plans are only useful once connected; a service that is down costs this wait once.
        self._settled.wait(connect_timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def recommend_experts(
        self, horizon_steps: int, bytes_per_expert: int, held_out_steps: int = 0,
        timeout: float = 60.0, replica_slots: int = 0, grad_bytes_per_expert: int = 0,
        max_load_ratio: float = 0.0,
    ) -> pb.RecommendExpertsResponse:
        """The service's expert placement advice for this job (blocking; grpc.RpcError on
        failure, e.g. FAILED_PRECONDITION when the window is too thin). The default timeout
        stays below the training process group's 120 s, which the other ranks wait in.
        replica_slots > 0 also asks for expert copies (the answer's `replicas`);
        max_load_ratio >= 1 bounds the busiest device's load (0: routes only)."""
        request = pb.RecommendExpertsRequest(job=self.job, horizon_steps=horizon_steps,
                                             bytes_per_expert=bytes_per_expert,
                                             held_out_steps=held_out_steps,
                                             replica_slots=replica_slots,
                                             grad_bytes_per_expert=grad_bytes_per_expert,
                                             max_load_ratio=max_load_ratio)
        return self._stub.RecommendExperts(request, timeout=timeout, metadata=self._metadata)

    def confirm_experts(self, step: int, maps: list[list[int]], timeout: float = 10.0,
                        copies: list[list[tuple[int, int]]] | None = None,
                        route_tables: list[list[list[int]]] | None = None) -> None:
        """Puts maps ([L][E] device of each expert id) in force from step on (blocking), with
        copies ([L] (expert id, device) lists) on top when given, routed by route_tables
        ([L][J][E]: device serving expert id e for samples on device d) when given."""
        request = pb.ConfirmExpertsRequest(
            job=self.job, step=step, maps=maps_to_proto(maps), copies=copies_to_proto(copies or []),
            route_tables=tables_to_proto(route_tables or []))
        self._stub.ConfirmExperts(request, timeout=timeout, metadata=self._metadata)

    def submit(self, step: int, layer: int, counts: RoundCounts, micro_batch: int = 0
               ) -> Future[RankPlan | None]:
        """Report one round (step, micro_batch, layer). counts.gather / scatter: [n, E] int
        counts in [0, 2^32 - 1], or [n, J] routes per device when the spec says device_counts
        (ValueError naming the field otherwise)."""
        key = RoundKey(step, micro_batch, layer).check()
        n = counts.samples
        for name, arr in (("gather", counts.gather), ("scatter", counts.scatter)):
            if arr is None and name == "scatter":
                continue
            if arr is None or arr.shape != (n, self._columns):
                shape = None if arr is None else arr.shape
                what = " (device_counts: routes per device)" if self.device_counts else ""
                raise ValueError(f"{name} must be [{n}, {self._columns}]{what}, got shape "
                                 f"{shape}")
        fut: Future[RankPlan | None] = Future()
        report = report_to_proto(self.job, step, layer, self.rank, counts,  # checks the values
                                 self.ranks if len(self.ranks) > 1 else (), micro_batch)
        report.generation = self._generation
        with self._lock:
            if self.rejected:
                fut.set_exception(NoPlan(f"rejected: {self.rejected}"))
                return fut
            if self._requests is None:
                fut.set_exception(ConnectionError(f"not connected to {self.address}"))
                return fut
            self._pending[key] = fut
            self._requests.put(report)
        return fut

    def close(self, unregister: bool = False) -> None:
        """Ends the stream and the background thread. unregister: also forget the job on the
        service (once, by one rank, after every rank's last round: the job's rounds end)."""
        if unregister and not self.rejected:
            try:
                self._stub.UnregisterJob(pb.UnregisterJobRequest(job=self.job), timeout=5.0,
                                         metadata=self._metadata)
            except grpc.RpcError as err:
                log.warning("could not unregister job %s: %s", self.job, err.details())
        self._closed.set()
        with self._lock:
            if self._requests is not None:
                self._requests.put(None)
            call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)
        self._channel.close()

    def _requests_of(self, q: queue.SimpleQueue[pb.Report | None]):
        while (item := q.get()) is not None:
            yield item

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._closed.is_set():
            try:
                reply = self._stub.RegisterJob(pb.RegisterJobRequest(job=self.job, spec=self.spec),
                                               timeout=5.0, metadata=self._metadata)
                self._generation = reply.generation
                q: queue.SimpleQueue[pb.Report | None] = queue.SimpleQueue()
                call = self._stub.Stream(self._requests_of(q), metadata=self._metadata)
                with self._lock:
                    self._requests, self._call = q, call
                self._connected.set()
                self._settled.set()
                if self._lost is not None:
                    log.warning("placement stream to %s back after %.0f s", self.address,
                                time.monotonic() - self._lost[0])
                    self._lost = None
                delay = self._backoff[0]
                for plan in call:
                    self._resolve(plan)
                reason = "stream ended"
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None
                reason = f"{code}"
                if code in _FATAL:
                    details = err.details() if hasattr(err, "details") else ""
                    self.rejected = f"{code.name}: {details}"
                    log.error("placement service %s rejected job %s for good (%s); training "
                              "goes on without placement", self.address, self.job, self.rejected)
                    self._disconnect(reason)
                    self._settled.set()
                    return
            self._disconnect(reason)
            if self._closed.wait(delay):
                break
            self.reconnects += 1
            delay = min(delay * 2, self._backoff[1])

    def _disconnect(self, reason: str) -> None:
        with self._lock:
            if self._requests is not None:
                self._requests.put(None)
            self._requests, self._call = None, None
            pending, self._pending = self._pending, {}
            self._connected.clear()
        if not self._closed.is_set():
            self._notice(reason)
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"placement stream lost: {reason}"))

    def _notice(self, reason: str) -> None:
        """One line when the service becomes unreachable, then one per NOTICE_SECONDS."""
        now = time.monotonic()
        if self._lost is None:
            self._lost = (now, now)
            log.warning("placement stream to %s lost (%s); retrying every %.3g s at most, rounds "
                        "fall back to no move meanwhile", self.address, reason, self._backoff[1])
        elif now - self._lost[1] >= NOTICE_SECONDS:
            self._lost = (self._lost[0], now)
            log.warning("placement service %s still unreachable after %.0f s (%s, %d attempts)",
                        self.address, now - self._lost[0], reason, self.reconnects)

    def _resolve(self, msg: pb.Plan) -> None:
        with self._lock:
            fut = self._pending.pop(RoundKey(msg.step, msg.micro_batch, msg.layer), None)
        if fut is None or fut.done():
            return  # a plan for a round the trainer already gave up on
        try:
            plan = plan_from_proto(msg)
        except ValueError as err:
            fut.set_exception(NoPlan(f"unreadable plan: {err}"))
            return
        if plan.solved:
            fut.set_result(plan)
        elif plan.status == INVALID:
            log.error("placement service rejected report: %s", plan.error)
            fut.set_exception(NoPlan(f"invalid: {plan.error}"))
        else:
            fut.set_exception(NoPlan(plan.reason or "fallback"))

"""Prometheus metrics of one server instance, in its own registry, and their HTTP endpoint.

Labels carry job ids, outcomes, channels and gRPC method names only, never sample data.
"""

from __future__ import annotations

import contextlib
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    start_http_server,
)

from netmoe.solver import Traffic

from .advisor import Realized
from .rounds import OUTCOMES

# Solver times span sub-millisecond two-stage solves to CP-SAT runs capped by the deadline.
SOLVE_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60)
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class Metrics:
    """Counters, gauges and histograms of the service; implements rounds.RoundObserver."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.solve_seconds = Histogram(
            "netmoe_solve_seconds", "Pure solver time per round.",
            buckets=SOLVE_BUCKETS, registry=reg,
        )
        self.rounds = Counter(
            "netmoe_rounds", "Rounds by outcome (solved or the fallback reason).",
            ["job", "outcome"], registry=reg,
        )
        self.routes = Counter(
            "netmoe_predicted_routes",
            "Predicted routes of finished rounds (gather l + scatter l+1), with the home "
            "placement and with the placement the ranks were told to use.",
            ["job", "channel", "placement"], registry=reg,
        )
        self.active_jobs = Gauge("netmoe_active_jobs", "Registered jobs.", registry=reg)
        self.active_streams = Gauge(
            "netmoe_active_streams", "Open worker report streams.", registry=reg
        )
        self.pending_bytes = Gauge(
            "netmoe_pending_report_bytes", "Bytes of the reports open rounds hold.", registry=reg
        )
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", GRPC_LABELS, registry=reg
        )
        self.grpc_handled = Counter(
            "grpc_server_handled", "RPCs completed on the server, by status code.",
            [*GRPC_LABELS, "grpc_code"], registry=reg,
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from RPC start to completion.",
            GRPC_LABELS, buckets=HANDLING_BUCKETS, registry=reg,
        )
        self.expert_window_bytes = Gauge(
            "netmoe_expert_window_bytes",
            "Bytes of round counts the job's expert placement window holds.", ["job"], registry=reg,
        )
        self.expert_window_steps = Gauge(
            "netmoe_expert_window_steps", "Steps the job's expert placement window holds.",
            ["job"], registry=reg,
        )
        self.expert_predicted_saving = Gauge(
            "netmoe_expert_predicted_saving_routes",
            "Inter-node routes per step (forward) the last recommended expert placement saves "
            "over sample-only placement on held-out rounds.", ["job"], registry=reg,
        )
        self.expert_realized = Counter(
            "netmoe_expert_realized_routes",
            "Inter-node routes of rounds solved under confirmed expert maps (joint) and of the "
            "plans the registered expert map would have got (sample_only).",
            ["job", "placement"], registry=reg,
        )
        self.replica_predicted_saving = Gauge(
            "netmoe_replica_predicted_saving_routes",
            "Inter-node routes per step (forward) the last recommended expert copies save over "
            "joint placement without them on held-out rounds.", ["job"], registry=reg,
        )
        self.replica_realized = Counter(
            "netmoe_replica_realized_routes",
            "Inter-node routes of rounds solved under confirmed copies (replicated) and of the "
            "plans the same maps would have got without copies (joint).",
            ["job", "placement"], registry=reg,
        )
        self.expert_predicted_load = Gauge(
            "netmoe_expert_predicted_load_ratio",
            "Busiest device's routes over the mean (mean over held-out layers) with the last "
            "recommended maps, copies and route tables.", ["job"], registry=reg,
        )
        self.expert_realized_load = Summary(
            "netmoe_expert_realized_load_ratio",
            "Busiest device's routes over the mean in the gather layer of rounds solved under "
            "confirmed maps (sum / count: the mean).", ["job"], registry=reg,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def round_finished(
        self, job: str, outcome: str, before: Traffic | None, after: Traffic | None
    ) -> None:
        self.rounds.labels(job, outcome).inc()
        if before is None or after is None:
            return
        for placement, t in (("home", before), ("planned", after)):
            self.routes.labels(job, "inter", placement).inc(t.inter)
            self.routes.labels(job, "intra", placement).inc(t.intra)

    def solve_finished(self, seconds: float) -> None:
        self.solve_seconds.observe(seconds)

    def window_changed(self, job: str, window_bytes: int, window_steps: int) -> None:
        self.expert_window_bytes.labels(job).set(window_bytes)
        self.expert_window_steps.labels(job).set(window_steps)

    def round_realized(self, job: str, realized: Realized) -> None:
        self.expert_realized.labels(job, "joint").inc(realized.joint_inter)
        self.expert_realized.labels(job, "sample_only").inc(realized.sample_only_inter)
        if realized.without_copies_inter is not None:
            self.replica_realized.labels(job, "replicated").inc(realized.joint_inter)
            self.replica_realized.labels(job, "joint").inc(realized.without_copies_inter)
        if realized.load_ratio is not None:
            self.expert_realized_load.labels(job).observe(realized.load_ratio)

    def forget_job(self, job: str) -> None:
        """Drops a job's label sets so unregistered jobs do not accumulate series."""
        for gauge in (self.expert_window_bytes, self.expert_window_steps,
                      self.expert_predicted_saving, self.replica_predicted_saving,
                      self.expert_predicted_load, self.expert_realized_load):
            _remove(gauge, job)
        for placement in ("joint", "sample_only"):
            _remove(self.expert_realized, job, placement)
        for placement in ("replicated", "joint"):
            _remove(self.replica_realized, job, placement)
        for outcome in OUTCOMES:
            _remove(self.rounds, job, outcome)
        for channel in ("inter", "intra"):
            for placement in ("home", "planned"):
                _remove(self.routes, job, channel, placement)

    def serve_http(self, host: str, port: int) -> int:
        """Starts GET /metrics on host:port (0 = ephemeral) in a daemon thread; returns the port."""
        httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (httpd, thread)
        return int(httpd.server_port)

    def stop_http(self) -> None:
        if self._http is None:
            return
        httpd, thread = self._http
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        self._http = None


def _remove(metric: Counter | Gauge | Summary, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # the label set was never used
        metric.remove(*labels)

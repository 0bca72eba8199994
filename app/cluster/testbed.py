"""An emulated multi-node cluster on one machine: network namespaces joined by shaped veth links.

Layout (docs/testbed.md says what was measured): one namespace per node with ``lo`` up and one
veth ``n{i}``; a bridge namespace whose bridge ``br0`` holds every node's veth peer ``p{i}``.
Addresses (``10.213.0.{i+1}/24``) exist only inside these namespaces, so nothing is routed on the
host. Every node link is shaped in both directions (egress of ``n{i}`` and of ``p{i}``) with an
htb root: a strict-priority class for packets under 128 bytes (pure ACKs must not queue behind
the other direction's data) and a rate-limited class with a large byte queue (small queues drop
and cause TCP timeouts). Optionally ``lo`` of each node is shaped too, which caps intra-node
bandwidth so the intra:inter ratio is set rather than left to the CPU.

Ranks run as ``ip netns exec NODE argv`` with ``GLOO_SOCKET_IFNAME`` set to the node's veth: gloo
then binds the veth address, and same-node peers reach it over ``lo`` (intra-node bytes never
touch the veth). ``Testbed`` is a context manager that always tears down: it kills only the
processes it started (by pid) and deletes its namespaces, which removes their links.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

SUBNET = "10.213.0"
MASTER_PORT = 29500
_ACK_BYTES = 128  # IP total length below this goes to the priority class
_SEQ = itertools.count()


class TestbedError(RuntimeError):
    """The emulated cluster cannot be built or run here (not root, no iproute2, a failed rank)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class TestbedConfig:
    """Shape of an emulated cluster.

    nodes: number of node namespaces (>= 1).
    rate_mbit: inter-node rate of each node link, per direction, in Mbit/s.
    intra_rate_mbit: rate of each node's ``lo`` (all intra-node traffic of that node), or None to
        leave it unshaped (then the CPU sets it).
    queue_bytes: byte queue of the rate-limited classes; large, since drops cost TCP timeouts.
    congestion: TCP congestion control inside the namespaces (namespaces here allow reno and bbr).
    prefix: namespace name prefix; the pid and a counter are appended so runs never collide.
    """

    __test__ = False  # not a pytest test class despite the name

    nodes: int = 2
    rate_mbit: float = 200.0
    intra_rate_mbit: float | None = None
    queue_bytes: int = 32 * 1024 * 1024
    congestion: str = "bbr"
    prefix: str = "netmoe"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {self.rate_mbit}")
        if self.intra_rate_mbit is not None and not self.intra_rate_mbit > 0:
            raise ValueError(f"intra_rate_mbit must be > 0 or None, got {self.intra_rate_mbit}")
        if self.queue_bytes < 64 * 1024:
            raise ValueError(f"queue_bytes must be >= 65536, got {self.queue_bytes}")
        if not self.prefix.isalnum():
            raise ValueError(f"prefix must be alphanumeric, got {self.prefix!r}")


@dataclass(frozen=True)
class LinkBytes:
    """Byte counters of one node's veth (node side): tx leaves the node, rx enters it."""

    node: int
    tx: int
    rx: int


def require_root() -> None:
    """Raise TestbedError unless this process is root with ``ip`` and ``tc`` on PATH."""
    if os.geteuid() != 0:
        raise TestbedError("the emulated cluster needs root (network namespaces); run as root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise TestbedError(f"the emulated cluster needs iproute2; not found on PATH: {missing}")


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TestbedError(f"command failed ({proc.returncode}): {' '.join(cmd)}: "
                           f"{proc.stderr.strip()}")
    return proc.stdout


def shaping_commands(netns: str, dev: str, rate_mbit: float, queue_bytes: int) -> list[list[str]]:
    """tc commands shaping egress of ``dev`` in ``netns``: priority for small packets, then data.

    The ACK class is guaranteed 5% and may borrow up to the full rate; the data class gets the
    rest and may borrow too; the parent caps the sum at ``rate_mbit``. The u32 filter matches an
    IPv4 total length below 128 (bits 7..15 of the 16-bit field at offset 2 are zero).
    """
    rate = f"{rate_mbit * 1e3:.0f}kbit"
    ack = f"{rate_mbit * 1e3 * 0.05:.0f}kbit"
    data = f"{rate_mbit * 1e3 * 0.95:.0f}kbit"
    # GSO hands veth/lo super-packets up to 64 KiB: bursts must hold one or htb stalls.
    burst = ["burst", "64k", "cburst", "64k", "quantum", "65536"]
    tc = ["tc", "-n", netns]
    mask = 0x10000 - _ACK_BYTES
    return [
        [*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"],
        [*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
         "rate", rate, "ceil", rate, *burst],
        [*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", "1:10", "htb",
         "rate", ack, "ceil", rate, "prio", "0", *burst],
        [*tc, "class", "add", "dev", dev, "parent", "1:1", "classid", "1:20", "htb",
         "rate", data, "ceil", rate, "prio", "1", *burst],
        [*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "pfifo",
         "limit", "10000"],
        [*tc, "qdisc", "add", "dev", dev, "parent", "1:20", "handle", "20:", "bfifo",
         "limit", str(queue_bytes)],
        [*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
         "u32", "match", "u16", "0x0000", f"0x{mask:04x}", "at", "2", "flowid", "1:10"],
    ]


class Testbed:
    """A live emulated cluster; use as a context manager (``with Testbed(cfg) as tb:``).

    Entering builds the namespaces and links; leaving (normally, on an exception, on SIGINT or
    SIGTERM) kills the processes started with ``launch`` and deletes every namespace.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, config: TestbedConfig) -> None:
        self.config = config
        tag = f"{config.prefix}{os.getpid()}x{next(_SEQ)}"
        self.node_ns: tuple[str, ...] = tuple(f"{tag}-n{i}" for i in range(config.nodes))
        self.bridge_ns = f"{tag}-br"
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._old_handlers: dict[int, object] = {}

    # ----- addresses and names
    def address(self, node: int) -> str:
        """IPv4 address of node ``node``'s veth (exists only inside the testbed)."""
        self._check_node(node)
        return f"{SUBNET}.{node + 1}"

    def veth(self, node: int) -> str:
        """Name of node ``node``'s veth inside its namespace."""
        self._check_node(node)
        return f"n{node}"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (*self.node_ns, self.bridge_ns)

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.config.nodes:
            raise ValueError(f"node must be in [0, {self.config.nodes}), got {node}")

    # ----- lifecycle
    def __enter__(self) -> Testbed:
        require_root()
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _install_signal_handlers(self) -> None:
        # SIGTERM would otherwise end the process without running finally blocks.
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    def _sysctl(self, netns: str) -> None:
        _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w",
              "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
              "net.ipv4.tcp_slow_start_after_idle=0",
              f"net.ipv4.tcp_congestion_control={self.config.congestion}"])

    def _add_ns(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._created.append(netns)
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        self._sysctl(netns)

    def _build(self) -> None:
        cfg = self.config
        self._add_ns(self.bridge_ns)
        _run(["ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge_ns, "link", "set", "br0", "up"])
        for node, netns in enumerate(self.node_ns):
            self._add_ns(netns)
            dev, port = self.veth(node), f"p{node}"
            _run(["ip", "link", "add", "name", dev, "netns", netns, "type", "veth",
                  "peer", "name", port, "netns", self.bridge_ns])
            _run(["ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", self.bridge_ns, "link", "set", port, "up"])
            _run(["ip", "-n", netns, "addr", "add", f"{self.address(node)}/24", "dev", dev])
            _run(["ip", "-n", netns, "link", "set", dev, "up"])
            for cmd in [*shaping_commands(netns, dev, cfg.rate_mbit, cfg.queue_bytes),
                        *shaping_commands(self.bridge_ns, port, cfg.rate_mbit, cfg.queue_bytes)]:
                _run(cmd)
            if cfg.intra_rate_mbit is not None:
                for cmd in shaping_commands(netns, "lo", cfg.intra_rate_mbit, cfg.queue_bytes):
                    _run(cmd)

    def close(self) -> None:
        """Kill started processes (by pid), delete the namespaces, restore signal handlers."""
        try:
            self.kill_all()
        finally:
            for netns in reversed(self._created):
                subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)
            self._created.clear()
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)  # type: ignore[arg-type]
            self._old_handlers.clear()

    # ----- processes
    def launch(self, node: int, argv: Sequence[str], env: Mapping[str, str] | None = None,
               stdout: IO[bytes] | None = None, stderr: IO[bytes] | None = None,
               ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside node ``node``'s namespace; returns its Popen.

        The environment is this process's, plus ``env``, plus MASTER_ADDR (node 0's veth address),
        MASTER_PORT (unless given) and GLOO_SOCKET_IFNAME (this node's veth). ``ip netns exec``
        execs ``argv`` in place, so the Popen pid is the rank's pid.
        """
        self._check_node(node)
        if not self._created:
            raise TestbedError("launch() needs an entered Testbed (use it as a context manager)")
        full_env = {**os.environ, **(env or {})}
        full_env["MASTER_ADDR"] = self.address(0)
        full_env.setdefault("MASTER_PORT", str(MASTER_PORT))
        full_env["GLOO_SOCKET_IFNAME"] = self.veth(node)
        proc = subprocess.Popen(["ip", "netns", "exec", self.node_ns[node], *argv],
                                env=full_env, stdout=stdout, stderr=stderr)
        self._procs.append(proc)
        return proc

    def launch_ranks(self, gpus_per_node: int, argv: Sequence[str], log_dir: Path,
                     env: Mapping[str, str] | None = None) -> list[subprocess.Popen[bytes]]:
        """Start ``nodes * gpus_per_node`` ranks; rank r runs on node r // gpus_per_node.

        Each rank gets RANK, WORLD_SIZE, LOCAL_RANK and its output in ``log_dir/rank{r}.log``.
        """
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")
        log_dir.mkdir(parents=True, exist_ok=True)
        world = self.config.nodes * gpus_per_node
        procs = []
        for rank in range(world):
            rank_env = {**(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(rank % gpus_per_node)}
            with open(log_dir / f"rank{rank}.log", "wb") as log:
                procs.append(self.launch(rank // gpus_per_node, argv, rank_env,
                                         stdout=log, stderr=subprocess.STDOUT))
        return procs

    def wait(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float,
             log_dir: Path | None = None) -> None:
        """Wait for every process to exit 0; on a failure or the timeout kill the rest and raise.

        A failed rank leaves its peers blocked in a collective, so one failure ends all.
        """
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or time.monotonic() > deadline:
                self.kill(procs)
                what = (f"rank {failed[0]} exited with {codes[failed[0]]}" if failed
                        else f"ranks did not finish within {timeout:.0f} s")
                tail = ""
                if log_dir is not None:
                    log = log_dir / f"rank{failed[0] if failed else 0}.log"
                    if log.exists():
                        tail = "\n" + "\n".join(log.read_text(errors="replace")
                                                .splitlines()[-15:])
                raise TestbedError(what + tail)
            if all(c == 0 for c in codes):
                return
            time.sleep(0.05)

    def kill(self, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        """Terminate the given processes (started by ``launch``), then kill those that linger."""
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 3.0
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill_all(self) -> None:
        """Terminate every process this testbed started."""
        self.kill(self._procs)

    @property
    def pids(self) -> tuple[int, ...]:
        """Pids of every process started by ``launch`` (running or not)."""
        return tuple(p.pid for p in self._procs)

    # ----- counters
    def link_bytes(self) -> list[LinkBytes]:
        """tx/rx byte counters of every node's veth, node side (includes headers and ACKs)."""
        out = []
        for node, netns in enumerate(self.node_ns):
            info = json.loads(_run(["ip", "-j", "-s", "-n", netns, "link", "show", "dev",
                                    self.veth(node)]))
            stats = info[0]["stats64"]
            out.append(LinkBytes(node, int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])))
        return out


def existing_namespaces() -> list[str]:
    """Names of every network namespace on this machine (``ip netns list``)."""
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line]

"""Helpers shared by test files of several folders (importable: tests/ is on sys.path)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from netmoe.app.reference.launch import free_port  # tests take it from here (one import to move)
from netmoe.protos import convert, placement_pb2_grpc
from netmoe.protos import placement_pb2 as pb
from netmoe.server.app import ServerHandle
from netmoe.solver import Topology, solve

# The smallest reference-MoE training run worth checking (TrainConfig fields).
TINY_TRAIN = dict(steps=3, samples_per_device=2, seq_len=16, d_model=32, heads=2, layers=2,
                  ffn=32, vocab=512)  # fmt: skip


def assert_same_training(a: list[Any], b: list[Any]) -> None:
    """Two runs of RankResults (netmoe.app.reference.results) trained alike: losses, parameter
    checksums and routes per rank equal within float summation noise."""
    np.testing.assert_allclose(b[0].loss, a[0].loss, rtol=1e-5)
    for ra, rb in zip(a, b, strict=True):
        assert ra.loss == rb.loss or np.allclose(ra.loss, rb.loss, rtol=1e-5)
        for name, (s, sq) in ra.param_checksum.items():
            s2, sq2 = rb.param_checksum[name]
            assert sq2 == pytest.approx(sq, rel=1e-4), name
            # A sum of mixed-sign entries may cancel to near zero, so its slack scales with the
            # tensor's norm: Adam turns the float noise of gradients that are zero analytically
            # (attention key biases) into steps of about lr x noise / eps, on any placement.
            assert s2 == pytest.approx(s, rel=1e-3, abs=1e-3 * sq**0.5), name
    routes = lambda rs: sum(np.asarray(r.routes).sum() for r in rs)  # noqa: E731
    assert routes(a) == routes(b)  # same routing, only the destinations differ


def assert_planned(results: list[Any], rounds: int) -> None:
    """Every rank's RankResult applied a plan in each of its rounds (no fallback) and the plans
    moved some samples."""
    placed = [r.placement for r in results]
    assert all(p.fallbacks == 0 and p.plans == rounds for p in placed), [
        (p.fallbacks, p.fallback_reasons) for p in placed]
    assert sum(p.moved for p in placed) > 0


@contextmanager
def gloo_group(rank: int, world: int, port: int,
               timeout: timedelta | None = None) -> Iterator[None]:
    """A default gloo process group on 127.0.0.1 for one spawned rank. On a clean exit every rank
    passes a barrier before the group is destroyed, so no rank tears its group down while a peer
    still talks to it; the group is destroyed on every exit. timeout: of its collectives (None:
    gloo's 30 minutes), so a collective a rank never enters fails instead of hanging."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    clean = False
    try:
        yield
        clean = True
    finally:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def _entry(target: Callable[..., None], rank: int, port: int, errors: Any, args: tuple) -> None:
    try:
        target(rank, port, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def spawn_ranks(target: Callable[..., None], world: int, *args: object,
                timeout: float = 120.0) -> None:
    """Runs target(rank, port, *args) in `world` processes forked from the fork server
    (netmoe.app.reference.launch.start_process: target and args picklable; target typically opens
    ``gloo_group(rank, world, port)``). Fails with the ranks' tracebacks, if a rank hangs past
    timeout (it is killed) or exits non-zero (an abort at exit included)."""
    import multiprocessing

    from netmoe.app.reference import hf_demo, torchtitan_demo
    from netmoe.app.reference.launch import start_process

    # The suite's ranks build Hugging Face and torchtitan models too: whichever test starts the
    # fork server, it imports their modules once (about 9 s) instead of once per such rank.
    preload = hf_demo.RANK_IMPORTS + torchtitan_demo.RANK_IMPORTS
    errors = multiprocessing.get_context("forkserver").Queue()
    port = free_port()
    procs = [start_process(_entry, target, r, port, errors, args, preload=preload)
             for r in range(world)]
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    errors.close()
    errors.join_thread()
    assert not msgs, "\n".join(msgs)
    assert not alive, f"ranks {[procs.index(p) for p in alive]} hung"
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int | None) -> Samples:
    """Every sample of a real HTTP scrape of 127.0.0.1:port/metrics, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


# --- the placement service: real streams and reports ------------------------------------------

# Slack on top of a deadline for the loopback round trip: a 2-core box at load 12 overran 1 s.
# Still far below what a deadline not applied would show (the held solves take 10 s; a round
# never closed blocks the recv).
MARGIN_S = 4.0


def stub_for(handle: ServerHandle) -> tuple[grpc.Channel, placement_pb2_grpc.PlacementServiceStub]:
    channel = grpc.insecure_channel(handle.address)
    return channel, placement_pb2_grpc.PlacementServiceStub(channel)


def run_without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Runs code in a fresh interpreter in which importing any of modules (top-level packages)
    fails, as on an image without that extra."""
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", f"import sys\n{block}{code}"],
                          capture_output=True, text=True, timeout=120)


def job_spec(nodes: int = 2, gpus: int = 4, experts: int = 16, spd: int = 4,
             deadline_ms: int = 5000, **extra: Any) -> pb.JobSpec:
    """A test job's spec (bf16 routes of hidden size 4096, the paper's links)."""
    return convert.job_spec(nodes, gpus, experts, spd, hidden_size=4096, deadline_ms=deadline_ms,
                            **extra)


def counts(rng: np.random.Generator, samples: int, nodes: int, experts: int) -> np.ndarray:
    """[samples, experts] routes where each sample prefers the experts of one node."""
    per_node = experts // nodes
    c = rng.poisson(1.0, size=(samples, experts))
    for i, n in enumerate(rng.integers(0, nodes, samples)):
        c[i, n * per_node:(n + 1) * per_node] += rng.poisson(8.0, per_node)
    return c


def round_reports(job: str, spec: pb.JobSpec, step: int, layer: int, seed: int,
                  id_base: int = 0) -> list[pb.Report]:
    """One report per rank; global ids id_base + a permutation, so ids are not row numbers."""
    rng = np.random.default_rng(seed)
    t = spec.topology
    j, n = spec.world_size, spec.samples_per_device
    ids = id_base + rng.permutation(j * n) * 3
    gather = counts(rng, j * n, t.nodes, t.experts)
    scatter = counts(rng, j * n, t.nodes, t.experts)
    return [
        pb.Report(job=job, step=step, layer=layer, rank=r,
                  sample_ids=ids[r * n:(r + 1) * n].tolist(),
                  gather=convert.counts_to_pb(gather[r * n:(r + 1) * n]),
                  scatter=convert.counts_to_pb(scatter[r * n:(r + 1) * n]))
        for r in range(j)
    ]


class Worker:
    """One rank's long-lived stream: send a report, read its plan."""

    def __init__(self, stub: placement_pb2_grpc.PlacementServiceStub) -> None:
        self._out: queue.Queue[pb.Report | None] = queue.Queue()
        self._plans = stub.Stream(iter(self._out.get, None))

    def send(self, report: pb.Report) -> None:
        self._out.put(report)

    def recv(self) -> pb.Plan:
        return next(self._plans)

    def ask(self, report: pb.Report) -> pb.Plan:
        self.send(report)
        return self.recv()

    def close(self) -> list[pb.Plan]:
        """Half-closes the stream and returns the plans still to come."""
        self._out.put(None)
        return list(self._plans)

    def hang_up(self) -> None:
        """Ends the request iterator of a stream the server already closed."""
        self._out.put(None)


def check_round(spec: pb.JobSpec, reports: list[pb.Report], plans: list[pb.Plan]) -> None:
    """Plans of one round (index = rank) form one balanced placement matching the solver."""
    j, n = spec.world_size, spec.samples_per_device
    ids = np.concatenate([np.array(r.sample_ids) for r in reports])
    held = np.concatenate([np.array(p.held_ids) for p in plans])
    assert sorted(held.tolist()) == sorted(ids.tolist())  # each sample held exactly once
    assert all(len(p.held_ids) == n for p in plans)
    device_of = {sid: d for r, p in zip(reports, plans, strict=True)
                 for sid, d in zip(r.sample_ids, p.dest, strict=True)}
    source = {sid: (r.rank, k) for r in reports for k, sid in enumerate(r.sample_ids)}
    for d, p in enumerate(plans):
        assert all(device_of[sid] == d for sid in p.held_ids)
        # Delivery order of all_to_all_single: by source rank, then source local order.
        order = [source[sid] for sid in p.held_ids]
        assert order == sorted(order)
    assert len({(p.before.inter, p.after.inter, p.after.intra) for p in plans}) == 1
    t = spec.topology
    topo = Topology(t.nodes, t.gpus_per_node, t.experts)
    gather = np.concatenate([convert.counts_from_pb(r.gather, "gather") for r in reports])
    scatter = np.concatenate([convert.counts_from_pb(r.scatter, "scatter") for r in reports])
    ref = solve(topo, gather, scatter, home=np.repeat(np.arange(j), n))
    assert [d for p in plans for d in p.dest] == list(ref.dest)
    assert plans[0].after.inter == ref.after.inter < plans[0].before.inter == ref.before.inter
    assert {p.status for p in plans} == {pb.PLAN_STATUS_OPTIMAL}


def run_ranks(handle: ServerHandle, per_rank: Callable[[int, Worker], object], ranks: int) -> list:
    """Runs per_rank(rank, worker) in one thread per rank, each with its own channel."""
    results: list[object] = [None] * ranks
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        channel, stub = stub_for(handle)
        try:
            worker = Worker(stub)
            results[rank] = per_rank(rank, worker)
            worker.close()
        except BaseException as err:
            errors.append(err)
        finally:
            channel.close()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def ask_rounds(handle: ServerHandle, rounds: list[list[pb.Report]], ranks: int
               ) -> list[list[tuple[pb.Plan, float]]]:
    """Every rank asks its report of each round in turn on its own stream; per rank and round
    (its plan, seconds the plan took)."""

    def per_rank(rank: int, worker: Worker) -> list[tuple[pb.Plan, float]]:
        out = []
        for reports in rounds:
            start_t = time.monotonic()
            out.append((worker.ask(reports[rank]), time.monotonic() - start_t))
        return out

    return run_ranks(handle, per_rank, ranks)


def check_invalid_round(answers: list[tuple[pb.Plan, float]], reports: list[pb.Report],
                        bad: int, needle: str, deadline_s: float) -> None:
    """answers (index = rank, as ``ask_rounds`` gives them) of a round in which rank ``bad``
    sent an invalid report: it gets INVALID with ``needle`` in the error and no held ids, every
    other rank its home placement with reason "invalid", at once rather than at the deadline."""
    for rank, (plan, took) in enumerate(answers):
        assert plan.step == reports[rank].step
        if rank == bad:
            assert plan.status == pb.PLAN_STATUS_INVALID and needle in plan.error, plan.error
            assert not plan.held_ids
        else:
            assert plan.status == pb.PLAN_STATUS_FALLBACK and plan.reason == "invalid"
            assert f"rank {bad}: {needle}" in plan.error, plan.error
            assert list(plan.held_ids) == list(reports[rank].sample_ids)
            assert took < deadline_s  # ended early, not at the deadline


# --- reliability: long and short runs, servers in their own processes ---------------------

def short_and_long(name: str, short: int, long: int) -> pytest.MarkDecorator:
    """The short size always runs; the long one is marked slow (runs with --runslow)."""
    return pytest.mark.parametrize(
        name,
        [pytest.param(short, id="short"), pytest.param(long, id="long", marks=pytest.mark.slow)],
    )


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def refused(address: str) -> bool:
    """Whether the server at address refuses new RPCs, as it does from its grace period on."""
    try:
        serving(address)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "",
             every: float = 0.01) -> None:
    """Polls predicate every `every` seconds until it is true; fails after timeout seconds,
    naming `what` it waited for."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        time.sleep(every)



def alive(pid: int) -> bool:
    """Process pid runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> set[int]:
    """The child processes of pid, of all its threads (none once it is gone)."""
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except FileNotFoundError:
            continue  # the thread ended since
    return found


class ServerProcess:
    """``netmoe serve`` in a subprocess (its RSS is its own); port fixed so it can restart."""

    def __init__(self, port: int = 0, *extra: str) -> None:
        env = {**os.environ, "NETMOE_DRAIN_SECONDS": "0", "NETMOE_GRACE_SECONDS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netmoe.app.cli", "serve", "--port", str(port),
             "--metrics-port", "0", *extra], stderr=subprocess.PIPE, text=True, env=env)
        log = ""
        assert self.proc.stderr is not None
        while "metrics on" not in log:
            line = self.proc.stderr.readline()
            assert line, f"server exited: {log}"
            log += line
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+) .*metrics on (http://\S+)", log)
        assert match, log
        self.port, self.metrics_url = int(match[1]), match[2]
        self.address = f"127.0.0.1:{self.port}"
        # Keep draining stderr (into ``log``) so the server never blocks on a full pipe.
        self.log = [log]
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr),
                                       daemon=True)
        self._drain.start()

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])  # type: ignore[index]

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        return {tuple(sorted(s.labels.items())): s.value
                for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == name}

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self._drain.join(10)
        return code




# --- a throwaway PKI (the openssl CLI) ------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    """name.pem, name.key in d: a CA named CN=name."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
            "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_leaf(d: Path, name: str, ca: str, ext: str, subject: str | None = None) -> None:
    """name.pem, name.key in d: a certificate signed by ca with extensions ext, its subject
    /CN=name unless given (openssl -subj form)."""
    (d / f"{name}.ext").write_text(ext + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject or f"/CN={name}",
            cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
            cwd=d)


# --- the emulated cluster ------------------------------------------------------------------------

_TESTBED_LINK = re.compile(r"(n|p)\d+|br0")  # the names netmoe.app.cluster.testbed gives its links


def root_links() -> set[str]:
    """Names of the links in the root network namespace."""
    import json

    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


@dataclass(frozen=True)
class BenchRun:
    """A finished bench subprocess: its pid names its testbed's namespaces (netmoe<pid>x...)."""

    pid: int
    returncode: int
    stdout: str
    stderr: str


def run_bench(argv: list[str], timeout: float = 900) -> BenchRun:
    """Runs argv to its end, keeping its pid, so a test can check that its own run left no
    namespace while other benches run on the machine. A run past timeout gets SIGTERM (the
    testbed then deletes its namespaces) before the test fails, never a bare SIGKILL."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"{argv[2:5]} still ran after {timeout} s; stopped it: {err[-3000:]}")
    return BenchRun(proc.pid, proc.returncode, out, err)


def leaked_links(before: set[str]) -> set[str]:
    """Testbed links in the root namespace that were not there before. Only the testbed's own
    names count: a container engine may add and remove its veths meanwhile."""
    return {name for name in root_links() - before if _TESTBED_LINK.fullmatch(name)}


# --- the reference model on gloo ranks -----------------------------------------------------------

def train_step(model: Any, opt: Any, dispatcher: Any, tokens: Any, world: int, hook: Any = None,
               copy_groups: Any = None) -> float:
    """One step of the reference MoE on this rank: loss over the global token count, replicated
    gradients all-reduced, expert copies' gradients summed (netmoe.client.replicas), Adam step.
    tokens: [n, S + 1] int64 local samples. Returns the global loss."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    result = model(tokens[:, :-1], dispatcher, hook)
    loss = F.cross_entropy(result.logits, tokens[:, 1:].reshape(-1), reduction="sum")
    loss = loss / (world * tokens[:, 1:].numel())
    opt.zero_grad(set_to_none=False)
    loss.backward()
    dense = model.dense_parameters()
    flat = torch.cat([p.grad.reshape(-1) for p in dense] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p in dense:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    if copy_groups is not None:
        from netmoe.client.replicas import sync_grads

        sync_grads(model.blocks, copy_groups)
    opt.step()
    return float(flat[-1])


def advisor_settled(handle: ServerHandle) -> None:
    """Waits until the service's advisor thread has processed every round solved so far (the
    expert windows and the realised-saving metrics are fed there, after the plans went out)."""
    handle.server.advisors.run(lambda: None).result(timeout=60)


def shuffled_reports(routes: np.ndarray, step: int
                     ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """One step's rounds for the expert window from routes [L, I, E] (row i = sample id 10 i):
    per layer (ids [I], gather [I, E], scatter [I, E] or None), rows shuffled per layer as if
    samples had moved, ids following them; the scatter is layer l+1's routing of the same rows."""
    rng = np.random.default_rng(1000 + step)
    layers = routes.shape[0]
    out = []
    for layer in range(layers):
        rows = rng.permutation(routes.shape[1])
        nxt = routes[layer + 1, rows] if layer + 1 < layers else None
        out.append((10 * rows, routes[layer, rows], nxt))
    return out


class Bystander:
    """A second job on the same server, solving one whole round after another with unary Solve
    in its own thread until ``stop``; every plan is checked against the solver (``check_round``:
    optimal, the solver's placement) and timed.

    deadline_ms: the job's round deadline; a round answered later than it plus MARGIN_S (the
    busy box's slack) counts as late. channel: the one to use (a TLS one), closed at ``stop``;
    None: an insecure channel to address.
    """

    def __init__(self, address: str, job: str = "bystander", deadline_ms: int = 2000,
                 channel: grpc.Channel | None = None) -> None:
        self.spec = job_spec(deadline_ms=deadline_ms)
        self.job = job
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._channel = channel or grpc.insecure_channel(address)
        self._stub = placement_pb2_grpc.PlacementServiceStub(self._channel)
        self._stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=self.spec), timeout=30)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bystander-{job}", daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            reports = round_reports(self.job, self.spec, step, 0, seed=step % 16)
            t0 = time.monotonic()
            try:
                reply = self._stub.Solve(pb.SolveRequest(reports=reports), timeout=60)
                self.latencies.append(time.monotonic() - t0)
                check_round(self.spec, reports, list(reply.plans))
            except BaseException as err:  # reported by stop(), in the test's thread
                self.errors.append(err)
                return
            step += 1

    def wait_rounds(self, rounds: int, timeout: float = 60.0) -> None:
        """Waits until ``rounds`` more rounds were answered (or one failed)."""
        want = len(self.latencies) + rounds
        deadline = time.monotonic() + timeout
        while len(self.latencies) < want and not self.errors:
            assert time.monotonic() < deadline, f"bystander answered {len(self.latencies)} rounds"
            time.sleep(0.01)

    def stop(self) -> list[float]:
        """Stops, unregisters the job and asserts every round was solved optimally in time;
        returns the latencies (seconds per round)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(90)
            try:
                self._stub.UnregisterJob(pb.UnregisterJobRequest(job=self.job), timeout=30)
            finally:
                self._channel.close()
        if self.errors:
            raise self.errors[0]
        assert self.latencies, "the bystander got no round answered"
        limit = self.spec.deadline_ms / 1000 + MARGIN_S
        assert max(self.latencies) < limit, (max(self.latencies), limit)
        return self.latencies

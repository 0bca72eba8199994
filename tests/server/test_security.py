"""Secure defaults: loopback binding, bearer token, TLS and mutual TLS, limits, no sample data in
metrics. Real servers on ephemeral loopback ports; a throwaway CA made with the openssl CLI."""

from __future__ import annotations

import logging
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from netmoe.app.cli import build_parser, main
from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.server import security
from netmoe.server.app import SERVICE_NAME, ServerHandle, start
from netmoe.server.cli import config_from_args
from netmoe.server.config import ServerConfig

from support import Worker, check_round, job_spec, make_ca, make_leaf, round_reports

TOKEN = "s3cret-Token_42"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def cfg(**kw: object) -> ServerConfig:
    return ServerConfig(**{"port": 0, "metrics_port": None, "drain_seconds": 0.0,
                           "grace_seconds": 0.5, **kw})


@pytest.fixture
def token_server() -> Iterator[ServerHandle]:
    handle = start(cfg(auth_token=TOKEN, metrics_port=0))
    yield handle
    handle.stop()


def every_non_health_method() -> list[tuple[str, bool, bool]]:
    """(path, request streaming, response streaming) of every served method but health."""
    methods = [
        (f"/{SERVICE_NAME}/{m.name}", m.client_streaming, m.server_streaming)
        for m in pb.DESCRIPTOR.services_by_name["PlacementService"].methods
    ]
    return [*methods, (f"/{REFLECTION}/ServerReflectionInfo", True, True)]


def raw_call(channel: grpc.Channel, path: str, client_stream: bool, server_stream: bool,
             metadata: list[tuple[str, str]]) -> None:
    """Calls ``path`` with an empty message (valid for every proto3 type); raises RpcError."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kind[client_stream, server_stream](path)  # bytes in, bytes out
    request = iter([b""]) if client_stream else b""
    result = call(request, timeout=10, metadata=metadata)
    if server_stream:
        list(result)


@pytest.mark.parametrize("metadata", [
    [],
    [("authorization", f"Bearer {TOKEN[:-1]}x")],
    [("authorization", TOKEN)],  # no scheme
    [("authorization", f"Bearer {TOKEN} ")],
    [("x-token", TOKEN)],
], ids=["missing", "wrong", "no-scheme", "trailing-space", "other-header"])
def test_without_the_token_every_method_but_health_is_unauthenticated(
    token_server: ServerHandle, metadata: list[tuple[str, str]]
) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        for path, cs, ss in every_non_health_method():
            with pytest.raises(grpc.RpcError) as err:
                raw_call(channel, path, cs, ss, metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
            assert "Bearer" in err.value.details()
        # An unknown method is refused the same way: no probing of what exists.
        with pytest.raises(grpc.RpcError) as err:
            raw_call(channel, "/netmoe.v1.PlacementService/Nope", False, False, metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10,
                             metadata=metadata)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    # Rejected calls are counted by code on the metrics endpoint.
    url = f"http://127.0.0.1:{token_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    assert 'grpc_code="UNAUTHENTICATED",grpc_method="RegisterJob"' in text


def test_the_right_token_opens_every_method(token_server: ServerHandle) -> None:
    auth = [("authorization", f"Bearer {TOKEN}")]
    spec = job_spec(nodes=1, gpus=2, experts=4, spd=2, deadline_ms=300)
    with grpc.insecure_channel(token_server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        assert stub.RegisterJob(pb.RegisterJobRequest(job="j", spec=spec), metadata=auth).created
        reports = round_reports("j", spec, 0, 0, seed=1)
        plans = stub.Solve(pb.SolveRequest(reports=reports), metadata=auth).plans
        assert [p.status for p in plans] == [pb.PLAN_STATUS_OPTIMAL] * 2
        streamed = list(stub.Stream(iter([round_reports("j", spec, 1, 0, seed=2)[0]]),
                                    metadata=auth, timeout=20))
        # Rank 1 never reports: the round ends incomplete, but the stream was admitted.
        assert [p.reason for p in streamed] == ["incomplete"]
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=auth))
        names = {s.name for s in reply.list_services_response.service}
        assert SERVICE_NAME in names
        stub.UnregisterJob(pb.UnregisterJobRequest(job="j"), metadata=auth)


# --- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs server (127.0.0.1, localhost), client and other-client; rogue signs
    rogue-client."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a throwaway CA")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue")
    make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                 "extendedKeyUsage=serverAuth")
    make_leaf(d, "client", "ca", "extendedKeyUsage=clientAuth")
    make_leaf(d, "other-client", "ca", "extendedKeyUsage=clientAuth")
    make_leaf(d, "rogue-client", "rogue", "extendedKeyUsage=clientAuth")
    return d


def tls_channel(handle: ServerHandle, pki: Path, ca: str = "ca",
                client: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{ca}.pem").read_bytes(),
        private_key=None if client is None else (pki / f"{client}.key").read_bytes(),
        certificate_chain=None if client is None else (pki / f"{client}.pem").read_bytes(),
    )
    return grpc.secure_channel(handle.address, creds)


def check(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                     timeout=10).status


def test_tls_serves_trusting_clients_only(pki: Path) -> None:
    handle = start(cfg(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")))
    try:
        with tls_channel(handle, pki) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            spec = job_spec(nodes=1, gpus=2, experts=4, spd=2)
            assert stub.RegisterJob(pb.RegisterJobRequest(job="t", spec=spec)).created
        for channel in (grpc.insecure_channel(handle.address), tls_channel(handle, pki, "rogue")):
            with channel, pytest.raises(grpc.RpcError) as err:
                check(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        ca = str(pki / "ca.pem")
        assert main(["health", "--server", handle.address, "--tls-ca", ca]) == 0
        assert main(["health", "--server", handle.address, "--timeout", "2"]) == 1  # plaintext
    finally:
        handle.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(pki: Path) -> None:
    handle = start(cfg(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                       tls_client_ca=str(pki / "ca.pem")))
    try:
        with tls_channel(handle, pki, client="client") as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        for client in (None, "rogue-client"):
            with tls_channel(handle, pki, client=client) as channel, \
                    pytest.raises(grpc.RpcError) as err:
                check(channel)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, client
        probe = ["health", "--server", f"localhost:{handle.port}", "--tls-ca", str(pki / "ca.pem")]
        assert main([*probe, "--timeout", "2"]) == 1  # no client certificate
        client = ["--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
        assert main([*probe, *client]) == 0
    finally:
        handle.stop()


def test_jobs_bound_to_certificates_refuse_other_clients(pki: Path) -> None:
    """--bind-jobs-to-certs: job "j" belongs to the certificate that registered it (CN=client);
    a client of the same CA with another certificate can do nothing to it, but registers and runs
    its own job; the owner's round is solved as usual."""
    handle = start(cfg(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                       tls_client_ca=str(pki / "ca.pem"), bind_jobs_to_certs=True))
    spec = job_spec(nodes=2, gpus=2, experts=8, spd=4, deadline_ms=30000)
    reports = round_reports("j", spec, 0, 0, seed=0)
    try:
        with tls_channel(handle, pki, client="client") as owner, \
                tls_channel(handle, pki, client="other-client") as other:
            mine = placement_pb2_grpc.PlacementServiceStub(owner)
            theirs = placement_pb2_grpc.PlacementServiceStub(other)
            assert mine.RegisterJob(pb.RegisterJobRequest(job="j", spec=spec)).created
            denied = "job 'j' belongs to client certificate CN='client', not CN='other-client'"
            calls = [
                lambda: theirs.RegisterJob(pb.RegisterJobRequest(job="j", spec=spec)),
                lambda: theirs.Solve(pb.SolveRequest(reports=reports)),
                lambda: theirs.RecommendExperts(pb.RecommendExpertsRequest(job="j")),
                lambda: theirs.ConfirmExperts(pb.ConfirmExpertsRequest(job="j")),
                lambda: theirs.UnregisterJob(pb.UnregisterJobRequest(job="j")),
                lambda: next(theirs.Stream(iter([reports[0]]))),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert denied in err.value.details()
            workers = [Worker(mine) for _ in reports]
            for w, r in zip(workers, reports, strict=True):
                w.send(r)
            check_round(spec, reports, [w.recv() for w in workers])
            for w in workers:
                assert w.close() == []
            assert theirs.RegisterJob(pb.RegisterJobRequest(job="k", spec=spec)).created
            with pytest.raises(grpc.RpcError) as err:
                mine.UnregisterJob(pb.UnregisterJobRequest(job="k"))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            mine.UnregisterJob(pb.UnregisterJobRequest(job="j"))
            # Gone, the id is free: the other certificate may now take it.
            assert theirs.RegisterJob(pb.RegisterJobRequest(job="j", spec=spec)).created
    finally:
        handle.stop()
    with pytest.raises(ValueError, match="bind_jobs_to_certs needs mutual TLS"):
        cfg(bind_jobs_to_certs=True)


def test_tls_and_token_together(pki: Path) -> None:
    handle = start(cfg(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                       auth_token=TOKEN))
    try:
        with tls_channel(handle, pki) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            req = pb.UnregisterJobRequest(job="none")
            with pytest.raises(grpc.RpcError) as err:
                stub.UnregisterJob(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.UnregisterJob(req, timeout=10,
                                   metadata=[("authorization", f"Bearer {TOKEN}")])
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # past authentication
    finally:
        handle.stop()


# --- binding and configuration --------------------------------------------------------------

def test_binding_beyond_loopback_needs_allow_remote_and_warns_without_auth(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    parser = build_parser()
    for argv in (["--host", "0.0.0.0"], ["--metrics-host", "10.1.2.3"]):
        with pytest.raises(ValueError, match=r"is not a loopback address.*--allow-remote"):
            config_from_args(parser.parse_args(["serve", *argv]), {})
    assert config_from_args(parser.parse_args(["serve"]), {}).host == "127.0.0.1"
    exposed = config_from_args(parser.parse_args(["serve", "--host", "0.0.0.0"]),
                               {"NETMOE_ALLOW_REMOTE": "1"})
    with caplog.at_level(logging.WARNING, logger="netmoe.server.security"):
        security.warn_if_exposed(exposed)
        security.warn_if_exposed(cfg())  # loopback: quiet
    assert [r.getMessage() for r in caplog.records] == [
        "netmoe serve: gRPC bound to 0.0.0.0 (not loopback) WITHOUT authentication: any host "
        "that reaches it can register jobs and read plans; set --auth-token-file or "
        "--tls-client-ca"
    ]
    caplog.clear()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    secured = config_from_args(parser.parse_args(["serve", "--host", "0.0.0.0", "--allow-remote",
                                                  "--auth-token-file", str(token_file)]), {})
    assert secured.auth_token == TOKEN and TOKEN not in repr(secured)
    with caplog.at_level(logging.WARNING, logger="netmoe.server.security"):
        security.warn_if_exposed(secured)
    assert not caplog.records


def test_bad_security_settings_name_the_setting() -> None:
    parser = build_parser()
    cases = {
        "NETMOE_ALLOW_REMOTE='maybe' is not a valid boolean": {"NETMOE_ALLOW_REMOTE": "maybe"},
        "auth_token must be non-empty printable ASCII": {"NETMOE_AUTH_TOKEN": "two words"},
        "--auth-token-file='/nonexistent/t' cannot be read":
            {"NETMOE_AUTH_TOKEN_FILE": "/nonexistent/t"},
        "give the token once": {"NETMOE_AUTH_TOKEN_FILE": "/x", "NETMOE_AUTH_TOKEN": "y"},
        "tls_cert and tls_key go together": {"NETMOE_TLS_CERT": "/c.pem"},
        "tls_client_ca='/ca.pem' needs tls_cert": {"NETMOE_TLS_CLIENT_CA": "/ca.pem"},
    }
    for message, env in cases.items():
        with pytest.raises(ValueError, match=message):
            config_from_args(parser.parse_args(["serve"]), env)
    # compose passes unset secrets as empty strings: they mean "not configured"
    assert config_from_args(parser.parse_args(["serve"]),
                            {"NETMOE_AUTH_TOKEN": "", "NETMOE_TLS_CERT": ""}).auth_token is None
    with pytest.raises(ValueError, match=r"tls_cert='/missing.pem' cannot be read"):
        start(cfg(tls_cert="/missing.pem", tls_key="/missing.key"))


# --- limits -------------------------------------------------------------------------------

def test_limits_fail_with_the_value_and_the_limit() -> None:
    handle = start(cfg(max_jobs=2, max_world_size=8, max_report_cells=4096,
                       max_message_bytes=64 * 1024))
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            big_topo = job_spec()
            big_topo.topology.nodes = 1 << 20
            cases = {
                "world_size=16 exceeds the server's max_world_size=8": job_spec(nodes=4, gpus=4),
                "nodes x gpus_per_node=4194304 exceeds the server's max_world_size=8": big_topo,
                # 2**31 experts would be a 16 GiB array if the Topology were built first.
                "samples_per_device x experts = 4 x 2147483648 = 8589934592 per report exceeds "
                "the server's max_report_cells=4096": job_spec(experts=1 << 31),
                "samples_per_device x experts = 512 x 16 = 8192 per report exceeds the server's "
                "max_report_cells=4096": job_spec(spd=512),
            }
            for message, spec in cases.items():
                with pytest.raises(grpc.RpcError) as err:
                    stub.RegisterJob(pb.RegisterJobRequest(job="big", spec=spec), timeout=10)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert message in err.value.details()
            for job in ("a", "b"):
                stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=job_spec()), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                stub.RegisterJob(pb.RegisterJobRequest(job="c", spec=job_spec()), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "job 'c': the server already holds max_jobs=2" in err.value.details()
            huge = pb.Report(job="a", rank=0, sample_ids=range(10**12, 10**12 + 20000))  # ~120 kB
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Stream(iter([huge]), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "vs. 65536" in err.value.details()  # gRPC names the size and the limit
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        handle.stop()


# --- isolation ------------------------------------------------------------------------------

def test_a_stream_only_gets_plans_of_its_own_job_and_metrics_carry_no_sample_data() -> None:
    handle = start(cfg(metrics_port=0))
    try:
        with grpc.insecure_channel(handle.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            spec = job_spec(nodes=1, gpus=2, experts=4, spd=2)
            for job in ("a", "b"):
                stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=spec), timeout=10)
            id_base = 987_654_321_000
            a = round_reports("a", spec, 0, 0, seed=3, id_base=id_base)
            b = round_reports("b", spec, 0, 0, seed=4, id_base=id_base)
            w0, w1 = Worker(stub), Worker(stub)
            w0.send(a[0])
            intruder = w0.ask(b[1])  # a stream bound to job a tries to report for job b
            assert intruder.status == pb.PLAN_STATUS_INVALID and intruder.job == "a"
            assert "differs from ('a', 0) this stream is bound to" in intruder.error
            assert not intruder.held_ids and not intruder.dest
            w1.send(a[1])
            plans = [w0.recv(), w1.recv()]
            assert [(p.job, p.rank, p.status) for p in plans] == [
                ("a", 0, pb.PLAN_STATUS_OPTIMAL), ("a", 1, pb.PLAN_STATUS_OPTIMAL)]
            assert w0.close() == [] and w1.close() == []  # nothing of job b came to a's streams
            # Job b never took the intruding report: its own ranks report (step 0, layer 0) fine.
            b0, b1 = Worker(stub), Worker(stub)
            b0.send(b[0])
            b1.send(b[1])
            assert [b0.recv().status, b1.recv().status] == [pb.PLAN_STATUS_OPTIMAL] * 2
            b0.close()
            b1.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        assert "netmoe_rounds_total" in text
        ids = {str(i) for r in (*a, *b) for i in r.sample_ids}
        assert not any(i in text for i in ids)
        assert str(id_base)[:9] not in text
    finally:
        handle.stop()


# --- the torch client against a secured service ----------------------------------------------

def _client_round(handle: ServerHandle, **security_kw: str) -> list[object]:
    """Both ranks of a 1 x 2 job submit one round through PlacementClient; their outcomes."""
    import numpy as np

    from netmoe.client.placement_client import PlacementClient
    from netmoe.protos.convert import counts_from_pb
    from netmoe.round import RoundCounts

    spec = job_spec(nodes=1, gpus=2, experts=4, spd=2)
    reports = round_reports("secure", spec, step=0, layer=0, seed=3)
    clients = [PlacementClient(handle.address, "secure", r, spec, connect_timeout=5.0,
                               backoff=(0.05, 0.2), **security_kw) for r in range(2)]
    try:
        futures = [
            c.submit(0, 0, RoundCounts(np.array(rep.sample_ids),
                                       counts_from_pb(rep.gather, "gather"),
                                       counts_from_pb(rep.scatter, "scatter")))
            for c, rep in zip(clients, reports, strict=True)
        ]
        out: list[object] = []
        for f in futures:
            try:
                out.append(f.result(timeout=10))
            except Exception as err:  # the client's "no plan": never raised into training
                out.append(err)
        return out
    finally:
        for c in clients:
            c.close()


def test_client_sends_the_token_and_speaks_mutual_tls(pki: Path) -> None:
    handle = start(cfg(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                       tls_client_ca=str(pki / "ca.pem"), auth_token=TOKEN))
    try:
        tls = {"tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "client.pem"),
               "tls_key": str(pki / "client.key")}
        plans = _client_round(handle, token=TOKEN, **tls)
        held = sorted(i for p in plans for i in p.held_ids)  # type: ignore[attr-defined]
        assert len(held) == 4 and len(set(held)) == 4
        wrong = _client_round(handle, token="wrong", **tls)
        assert all(isinstance(w, Exception) for w in wrong)
    finally:
        handle.stop()


def test_client_takes_the_token_from_the_environment(
    token_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETMOE_AUTH_TOKEN", TOKEN)
    plans = _client_round(token_server)
    assert all(not isinstance(p, Exception) for p in plans)
    monkeypatch.delenv("NETMOE_AUTH_TOKEN")
    assert all(isinstance(p, Exception) for p in _client_round(token_server))

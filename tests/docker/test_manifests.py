"""docker/k8s against the Kubernetes schemas (kubernetes-validate) and against the compose file
and the service's own option parser; docker/grafana's dashboard and alert rules against the
metrics a live `netmoe serve` exposes after a short training job."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from netmoe.app.cli import build_parser
from netmoe.app.reference.launch import free_port, run_ranks
from netmoe.app.reference.train import TrainConfig
from netmoe.protos import placement_pb2
from netmoe.server.cli import config_from_args
from netmoe.server.rounds import OUTCOMES

from support import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[2]
K8S, GRAFANA = ROOT / "docker" / "k8s", ROOT / "docker" / "grafana"
BIN = Path(sys.executable).parent
# Native sidecars (initContainers[].restartPolicy) are in the API from 1.28, on by default 1.29.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def k8s_docs() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schemas(version: str) -> None:
    docs = k8s_docs()
    assert {d["kind"] for d in docs} == {"Pod", "Secret", "Service", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


def test_schema_validation_can_fail() -> None:
    pod = by_kind("Pod")
    typo = copy.deepcopy(pod)
    typo["spec"]["initContainers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(typo, VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(pod)
    wrong_type["spec"]["initContainers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, VERSIONS[-1])
    # Before 1.28 an init container had no restartPolicy: the sidecar is not expressible.
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(pod, "1.27.0", strict=True)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_sidecar_is_native_probed_secured_as_in_compose_and_bounded() -> None:
    pod, secret = by_kind("Pod"), by_kind("Secret")
    spec = pod["spec"]
    (sidecar,) = spec["initContainers"]
    (trainer,) = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar, not a one-shot init
    assert spec["restartPolicy"] == "Never"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"][:2] == ["netmoe", "health"], probe

    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]
    uid, gid = (int(x) for x in compose["trainer"]["user"].split(":"))
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (
        uid, gid)
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in (sidecar, trainer):
        ctx = container["securityContext"]
        assert ctx["capabilities"]["drop"] == compose["sidecar"]["cap_drop"] == ["ALL"]
        assert ctx["readOnlyRootFilesystem"] is compose["sidecar"]["read_only"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert "no-new-privileges:true" in compose[container["name"].split("-")[-1]][
            "security_opt"]
        res = container["resources"]
        assert set(res) == {"requests", "limits"} and set(res["limits"]) == {"cpu", "memory"}

    # The token: one Secret, mounted for the sidecar, an env reference for the trainer.
    name = secret["metadata"]["name"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == name and "token" in secret["stringData"]
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == volume["name"])
    assert env_of(sidecar)["NETMOE_AUTH_TOKEN_FILE"] == f"{mount['mountPath']}/token"
    assert env_of(trainer)["NETMOE_AUTH_TOKEN"] == {
        "secretKeyRef": {"name": name, "key": "token"}}

    # Ports: what Prometheus is told to scrape is what the service binds.
    env = env_of(sidecar)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["NETMOE_METRICS_PORT"] == str(
        sidecar["ports"][0]["containerPort"])
    cfg = TrainConfig.from_dict(json.loads(env_of(trainer)["NETMOE_TRAIN_CONFIG"]))
    assert cfg.server == f"127.0.0.1:{env['NETMOE_PORT']}"


def test_sidecar_environment_is_accepted_by_netmoe_serve(tmp_path: Path) -> None:
    (sidecar,) = by_kind("Pod")["spec"]["initContainers"]
    env = env_of(sidecar)
    token = tmp_path / "token"
    token.write_text("a" * 64 + "\n")
    env["NETMOE_AUTH_TOKEN_FILE"] = str(token)  # the mounted Secret
    cfg = config_from_args(build_parser().parse_args(["serve"]), env)
    assert cfg.host == "127.0.0.1"  # the image default: gRPC never on the pod IP
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 9464)
    assert cfg.auth_token == "a" * 64


def test_job_carries_a_sidecar_per_pod_and_each_group_finds_its_leaders(tmp_path: Path) -> None:
    """job.yaml: an Indexed Job of one pod per node behind a headless Service; the trainer's
    sidecars are the pods' DNS names on the sidecar's port, the sidecars serve the pod IP with
    the token, and the groups' first nodes (whose sidecars solve) are pods 0 and 2."""
    svc, job = by_kind("Service"), by_kind("Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    name, domain = job["metadata"]["name"], svc["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == domain
    assert svc["spec"]["selector"] == {"job-name": name}
    (sidecar,) = pod["initContainers"]
    (trainer,) = pod["containers"]
    assert sidecar["restartPolicy"] == "Always" and pod["restartPolicy"] == "Never"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["exec"]["command"][:2] == ["netmoe", "health"], probe
    for container in (sidecar, trainer):
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False

    env = env_of(sidecar)
    port = int(env["NETMOE_PORT"])
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]}["placement"] == port
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]}["placement"] == port
    token = tmp_path / "token"
    token.write_text("a" * 64 + "\n")
    served = config_from_args(build_parser().parse_args(["serve"]),
                              {**env, "NETMOE_AUTH_TOKEN_FILE": str(token)})
    assert served.host == "0.0.0.0" and served.allow_remote and served.auth_token == "a" * 64

    cfg = TrainConfig.from_dict(json.loads(env_of(trainer)["NETMOE_TRAIN_CONFIG"]))
    assert cfg.nodes == spec["completions"] and served.max_world_size >= cfg.world
    assert cfg.sidecars == tuple(f"{name}-{k}.{domain}:{port}" for k in range(cfg.nodes))
    args = trainer["command"]
    flag = lambda f: args[args.index(f) + 1]  # noqa: E731
    assert (int(flag("--nnodes")), int(flag("--nproc-per-node"))) == (cfg.nodes,
                                                                       cfg.gpus_per_node)
    assert flag("--master-addr") == f"{name}-0.{domain}"
    leaders = sorted({ranks[0] // cfg.gpus_per_node for ranks in cfg.groups.ranks})
    assert leaders == [0, 2]


# --- the dashboard and the alert rules ------------------------------------------------------

PROMQL_WORDS = {"sum", "rate", "histogram_quantile", "absent", "by", "without", "or", "and",
                "unless", "on", "ignoring", "bool", "offset"}
PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every target
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def expressions() -> dict[str, str]:
    dash = json.loads((GRAFANA / "netmoe-dashboard.json").read_text())
    exprs = {f"panel {p['title']!r} {t['refId']}": t["expr"]
             for p in dash["panels"] for t in p["targets"]}
    rules = yaml.safe_load((GRAFANA / "alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Every identifier of expr that is neither a PromQL word, a label nor a number."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", bare)
    names = set(re.findall(r"[A-Za-z_:][\w:]*", bare)) - PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d+(\.\d+)?|e\d+", n)}


def test_dashboard_and_rules_are_complete() -> None:
    dash = json.loads((GRAFANA / "netmoe-dashboard.json").read_text())
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("outcome", "fallback ratio", "p50", "p99", "plan wait", "predicted",
                  "realised", "active jobs", "active streams"):
        assert topic in titles or any(topic in t["legendFormat"] for p in dash["panels"]
                                      for t in p["targets"]), topic
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
    rules = yaml.safe_load((GRAFANA / "alerts.yaml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"NetmoeDown", "NetmoeFallbackRatioHigh",
                                          "NetmoeSolveP99NearDeadline"}
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] and rule["annotations"]["summary"]
    scrape = yaml.safe_load((GRAFANA / "prometheus.yaml").read_text())
    assert scrape["rule_files"] == ["alerts.yaml"]
    assert [j["job_name"] for j in scrape["scrape_configs"]] == ["netmoe"]  # NetmoeDown's job
    assert metric_names('sum by (le) (rate(x_bucket{a="b"}[5m])) > 0.8 * 0.05') == {"x_bucket"}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[dict]]]:
    """Samples of a real `netmoe serve` after a 2-rank job that adopted expert maps:
    {sample name: [labels, ...]}."""
    grpc_port, metrics_port = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NETMOE_")},
           "NETMOE_PORT": str(grpc_port), "NETMOE_METRICS_PORT": str(metrics_port),
           "NETMOE_EXPERT_WINDOW_STEPS": "2", "NETMOE_GRACE_SECONDS": "1",
           "NETMOE_DRAIN_SECONDS": "0"}
    proc = subprocess.Popen([str(BIN / "netmoe"), "serve"], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(BIN / "netmoe"), "health", "--server",
                              f"127.0.0.1:{grpc_port}"], capture_output=True,
                             timeout=30).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "netmoe serve died"
            time.sleep(0.3)
        cfg = TrainConfig(**{**TINY_TRAIN, "steps": 4, "nodes": 2, "gpus_per_node": 1,
                             "placement": "service", "server": f"127.0.0.1:{grpc_port}",
                             "job": "dashboard", "adopt_experts_at": 2,
                             "expert_placement": "force",
                             "unregister": False,  # its per-job series are scraped below
                             "cache_dir": str(tmp_path_factory.mktemp("cache"))})
        results = run_ranks(cfg, stall_seconds=300)
        assert results[0].expert_moves.adopted and results[0].placement.fallbacks == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        samples: dict[str, list[dict]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append(s.labels)
        yield samples
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()


def test_every_metric_and_label_the_dashboard_and_rules_use_exists(
    scraped: dict[str, list[dict]]
) -> None:
    methods = {m.name for m in placement_pb2.DESCRIPTOR.services_by_name[
        "PlacementService"].methods}
    known_values = {"outcome": set(OUTCOMES), "grpc_method": methods}
    for where, expr in expressions().items():
        names = metric_names(expr)
        assert names, where
        for name in names - PROMETHEUS_OWN:
            assert name in scraped, f"{where}: {name} is not exported"
        for name, matchers in SELECTOR.findall(expr):
            if name in PROMETHEUS_OWN:
                continue
            for label, op, value in MATCHER.findall(matchers):
                values = {labels[label] for labels in scraped[name] if label in labels}
                assert values, f"{where}: {name} has no label {label}"
                if op == "=":  # the value is one the service writes
                    assert value in values | known_values.get(label, set()), (where, value)
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert any(label in labels for n in names for labels in scraped[n]), (
                    f"{where}: no series of {names} has label {label}")

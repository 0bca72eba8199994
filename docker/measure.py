"""Figures of the sidecar image on this machine's engine: layer sizes, `docker run` to SERVING
on a published loopback port, and `docker stop` time (exit 0 checked), median of N runs.
    ./run python docker/measure.py [IMAGE] [N]      default: netmoe-sidecar:latest 5
Needs a running dockerd. Health is polled in-process every 20 ms (no probe process start)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True,
                          timeout=120).stdout.strip()


def serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(image: str, runs: int) -> None:
    print(docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image))
    print(f"total {int(docker('image', 'inspect', '-f', '{{.Size}}', image)) / 1e6:.1f} MB")
    up, down = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        cid = docker("run", "-d", "--read-only", "--cap-drop", "ALL", "--security-opt",
                     "no-new-privileges", "-e", "NETMOE_HOST=0.0.0.0", "-e",
                     "NETMOE_ALLOW_REMOTE=1", "-p", "127.0.0.1::50051", image)
        try:
            addr = docker("port", cid, "50051/tcp").splitlines()[0]
            while not serving(addr):
                time.sleep(0.02)
            t1 = time.perf_counter()
            docker("stop", "-t", "15", cid)
            t2 = time.perf_counter()
            code = docker("inspect", "-f", "{{.State.ExitCode}}", cid)
            assert code == "0", f"exit code {code}"
        finally:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)
        up.append(t1 - t0)
        down.append(t2 - t1)
    print(f"run -> SERVING: median {statistics.median(up):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in up)})")
    print(f"docker stop: median {statistics.median(down):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in down)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "netmoe-sidecar:latest",
         int(sys.argv[2]) if len(sys.argv) > 2 else 5)

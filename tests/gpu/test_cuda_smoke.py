"""CUDA smoke test: one process (NCCL, world 1) runs the dispatcher, the placement client against
an embedded service, and the Hugging Face adapter's forward and backward in bf16 on ``cuda``.
Every tensor the calls return must be on the GPU (only split sizes go to the host). Skipped
without CUDA; on a GPU machine: ``./run test tests/gpu -q``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import spawn_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

E, K, N, S, D = 4, 2, 2, 8, 16


def _on_gpu(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.device.type == "cuda", t.device


def _worker(rank: int, port: int, address: str) -> None:
    import torch.distributed as dist

    from netmoe.app.reference.hf_demo import tiny_config
    from netmoe.client.hf import parallelize
    from netmoe.client.job import JobShape

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    try:
        shape = JobShape(nodes=1, gpus_per_node=1, experts=E, samples_per_device=N, seq_len=S,
                         hidden_size=D, deadline_ms=5000)
        ep = shape.expert_parallel(0, address, "cuda-smoke")
        gen = torch.Generator(device=dev).manual_seed(0)
        h = torch.randn(N * S, D, device=dev, generator=gen, dtype=torch.bfloat16,
                        requires_grad=True)
        logits = torch.randn(N * S, E, device=dev, generator=gen, requires_grad=True)
        weights, ids = torch.softmax(logits, -1).topk(K)
        side = ep.samples(labels=torch.arange(N, device=dev))
        ticket = ep.submit(0, 0, ids, None)
        routes = ep.dispatch(0, h, ids, weights)
        experts = {e: torch.nn.Linear(D, D, device=dev, dtype=torch.bfloat16) for e in range(E)}
        out = ep.expert_outputs(routes, experts)
        got, _ = ep.combine(0, out, routes, ticket, side)
        _on_gpu(routes.x, routes.weight, out, got, side["labels"])
        assert (got.dtype, routes.weight.dtype) == (torch.bfloat16, torch.float32)
        got.float().sum().backward()
        _on_gpu(h.grad, logits.grad)
        st = ep.placement.stats
        assert (st.plans, st.fallbacks) == (1, 0), st.reasons
        assert ep.dispatcher.stats.bytes_per_route("combine") == D * 2 + 16
        ep.close(unregister=True)

        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        cfg = tiny_config("mixtral", vocab=64, hidden=32, layers=2, experts=E)
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").to(
            dev, torch.bfloat16)
        lm = parallelize(model)
        tokens = torch.randint(0, 64, (N, S), device=dev)
        step = lm(input_ids=tokens, labels=tokens)
        _on_gpu(step.loss, step.logits, step.held_ids)
        assert step.logits.dtype == torch.bfloat16 and torch.isfinite(step.loss)
        step.loss.backward()
        grads = [p.grad for p in lm.parameters() if p.grad is not None]
        assert lm.model.model.embed_tokens.weight.grad is not None
        _on_gpu(*grads)
        lm.all_reduce_gradients()
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


@pytest.fixture
def service() -> Iterator[ServerHandle]:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0))
    yield handle
    handle.stop()


def test_dispatcher_placement_and_hf_adapter_run_on_one_gpu(service: ServerHandle) -> None:
    spawn_ranks(_worker, 1, service.address, timeout=600)

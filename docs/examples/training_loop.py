"""A custom expert-parallel MoE trained with netmoe's per-layer calls (4 gloo ranks, 2 x 2):
AdamW steps of 2 micro-batches each (gradient accumulation), every MoE block recomputed in the
backward pass (torch.utils.checkpoint)."""
import os
import sys
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from netmoe.client.job import JobShape
from netmoe.client.layer import SampleTensors

# The job's sizes, stated once: 2 nodes x 2 devices, N samples of S tokens per rank, fp32 states.
SHAPE = JobShape(nodes=2, gpus_per_node=2, experts=8, samples_per_device=2, seq_len=8,
                 hidden_size=16, dtype_bytes=4, deadline_ms=5000)
N, S, D, E = SHAPE.samples_per_device, SHAPE.seq_len, SHAPE.hidden_size, SHAPE.experts
WORLD = SHAPE.ep_size  # one expert-parallel group spans the job: its devices are its ranks
K, LAYERS, STEPS, MICRO = 2, 2, 3, 2


def rank_main(rank: int, server: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ep = SHAPE.expert_parallel(rank, server, "example")  # plan wait: derived from the deadline
    layout = ep.layout
    torch.manual_seed(0)  # replicated parts equal on every rank; experts: this rank's only
    routers = torch.nn.ModuleList(torch.nn.Linear(D, E) for _ in range(LAYERS))
    experts = [{e: torch.nn.Linear(D, D) for e in layout.local_experts} for _ in range(LAYERS)]
    embed, head = torch.nn.Embedding(64, D), torch.nn.Linear(D, 64)
    dense = [*routers.parameters(), *embed.parameters(), *head.parameters()]
    params = dense + [p for layer in experts for m in layer.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)

    def block(step: int, micro: int, layer: int, side: SampleTensors, h: torch.Tensor
              ) -> torch.Tensor:
        weights, ids = torch.softmax(routers[layer](h), -1).topk(K)
        with torch.no_grad():
            nxt = routers[layer + 1](h).topk(K).indices if layer + 1 < LAYERS else None
        # Right after routing, never blocks; in the recompute it returns the forward's plan.
        ticket = ep.submit(step, layer, ids, nxt, micro_batch=micro)
        routes = ep.dispatch(layer, h, ids, weights / weights.sum(-1, keepdim=True))
        out = ep.expert_outputs(routes, experts[layer])  # weighted outputs + residual once
        h, _ = ep.combine(layer, out, routes, ticket, side)  # to each sample's new rank, with
        return h  # its side tensors (labels here; not again in the recompute)

    for step in range(STEPS):
        opt.zero_grad()
        total = torch.zeros(())
        for micro in range(MICRO):
            gen = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
            tokens = torch.randint(0, 64, (N, S + 1), generator=gen)
            h = embed(tokens[:, :-1]).reshape(N * S, D)
            side = ep.samples(labels=tokens[:, 1:])  # per-sample tensors [N, ...]
            for layer in range(LAYERS):
                h = checkpoint(partial(block, step, micro, layer, side), h, use_reentrant=False)
            loss = torch.nn.functional.cross_entropy(head(h), side["labels"].reshape(-1),
                                                     reduction="sum")
            (loss / (WORLD * N * S * MICRO)).backward()
            total += loss.detach()
        for p in dense:  # replicated parameters: sum the ranks' gradients
            dist.all_reduce(p.grad)
        opt.step()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {float(total) / (WORLD * N * S * MICRO):.4f}", flush=True)
    st = ep.placement.stats
    print(f"rank {rank}: {st.plans} plans, {st.replays} recomputed, {st.fallbacks} fallbacks",
          flush=True)
    dist.barrier()
    ep.close(unregister=rank == 0)
    dist.destroy_process_group()


if __name__ == "__main__":
    from netmoe.app.reference.launch import free_port
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    # Embedded (or: netmoe serve); no health probe watches it, so it stops without a drain.
    with start(ServerConfig(port=0, metrics_port=None, drain_seconds=0)) as service:
        # forkserver: ranks fork from one clean process that imported torch once (not from
        # this one, whose gRPC threads a fork would copy mid-flight).
        mp.start_processes(rank_main, (service.address, free_port()), WORLD,
                           start_method="forkserver")
    sys.exit(0)

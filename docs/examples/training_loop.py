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

from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.layer import ExpertParallel
from netmoe.client.placement_client import PlacementClient, job_spec
from netmoe.client.planning import Placement

NODES, GPUS, N, S, D, E, K, LAYERS = 2, 2, 2, 8, 16, 8, 2, 2  # N samples of S tokens per rank
STEPS, MICRO = 3, 2


def rank_main(rank: int, server: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=NODES * GPUS)
    layout = Layout(rank, NODES * GPUS, GPUS, E, N, S)
    spec = job_spec(NODES, GPUS, E, N, hidden_size=D, dtype_bytes=4, deadline_ms=5000)
    client = PlacementClient(server, "example", rank, spec)
    ep = ExpertParallel(TokenDispatcher(layout), Placement(client, rank, NODES * GPUS, N, 10.0))
    torch.manual_seed(0)  # replicated parts equal on every rank; experts: this rank's only
    routers = torch.nn.ModuleList(torch.nn.Linear(D, E) for _ in range(LAYERS))
    experts = [{e: torch.nn.Linear(D, D) for e in layout.local_experts} for _ in range(LAYERS)]
    embed, head = torch.nn.Embedding(64, D), torch.nn.Linear(D, 64)
    dense = [*routers.parameters(), *embed.parameters(), *head.parameters()]
    params = dense + [p for layer in experts for m in layer.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)

    def block(step: int, micro: int, layer: int, plans: list, h: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.softmax(routers[layer](h), -1).topk(K)
        with torch.no_grad():
            nxt = routers[layer + 1](h).topk(K).indices if layer + 1 < LAYERS else None
        # Right after routing, never blocks; in the recompute it returns the forward's plan.
        ticket = ep.submit(step, layer, ids, nxt, micro_batch=micro)
        routes = ep.dispatch(layer, h, ids, weights / weights.sum(-1, keepdim=True))
        out = ep.expert_outputs(routes, experts[layer])  # weighted outputs + residual once
        h, plans[layer] = ep.combine(layer, out, routes, ticket)  # to each sample's new rank
        return h

    for step in range(STEPS):
        opt.zero_grad()
        total = torch.zeros(())
        for micro in range(MICRO):
            gen = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
            tokens = torch.randint(0, 64, (N, S + 1), generator=gen)
            h, labels = embed(tokens[:, :-1]).reshape(N * S, D), tokens[:, 1:]
            plans: list = [None] * LAYERS
            for layer in range(LAYERS):
                fn = partial(block, step, micro, layer, plans)
                h = checkpoint(fn, h, use_reentrant=False)
                labels = ep.move(labels, plans[layer])  # per-sample tensors follow their samples
            loss = torch.nn.functional.cross_entropy(head(h), labels.reshape(-1), reduction="sum")
            (loss / (NODES * GPUS * N * S * MICRO)).backward()
            total += loss.detach()
        for p in dense:  # replicated parameters: sum the ranks' gradients
            dist.all_reduce(p.grad)
        opt.step()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {float(total) / (NODES * GPUS * N * S * MICRO):.4f}",
                  flush=True)
    st = ep.placement.stats
    print(f"rank {rank}: {st.plans} plans, {st.replays} recomputed, {st.fallbacks} fallbacks",
          flush=True)
    dist.barrier()
    client.close(unregister=rank == 0)
    dist.destroy_process_group()


if __name__ == "__main__":
    from netmoe.reference.launch import free_port
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    with start(ServerConfig(port=0, metrics_port=None)) as service:  # or: netmoe serve
        mp.start_processes(rank_main, (service.address, free_port()), NODES * GPUS,
                           start_method="spawn")
    sys.exit(0)

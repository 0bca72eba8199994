"""A custom expert-parallel MoE trained with netmoe's per-layer calls (4 gloo ranks, 2 x 2)."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.layer import ExpertParallel
from netmoe.client.placement_client import PlacementClient, job_spec
from netmoe.client.planning import Placement

NODES, GPUS, N, S, D, E, K, LAYERS = 2, 2, 2, 8, 16, 8, 2, 2  # N samples of S tokens per rank


def rank_main(rank: int, server: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=NODES * GPUS)
    layout = Layout(rank, NODES * GPUS, GPUS, E, N, S)
    spec = job_spec(NODES, GPUS, E, N, hidden_size=D, dtype_bytes=4, deadline_ms=2000)
    client = PlacementClient(server, "example", rank, spec)
    ep = ExpertParallel(TokenDispatcher(layout), Placement(client, rank, NODES * GPUS, N, 5.0))
    torch.manual_seed(0)  # replicated parts equal on every rank; experts: this rank's only
    routers = [torch.nn.Linear(D, E) for _ in range(LAYERS)]
    experts = [{e: torch.nn.Linear(D, D) for e in layout.local_experts} for _ in range(LAYERS)]
    embed, head = torch.nn.Embedding(64, D), torch.nn.Linear(D, 64)
    tokens = torch.randint(0, 64, (N, S + 1), generator=torch.Generator().manual_seed(rank))
    h, labels = embed(tokens[:, :-1]).reshape(N * S, D), tokens[:, 1:]
    for layer in range(LAYERS):
        weights, ids = torch.softmax(routers[layer](h), -1).topk(K)
        nxt = routers[layer + 1](h).topk(K).indices if layer + 1 < LAYERS else None
        ticket = ep.submit(0, layer, ids, nxt)  # right after routing: never blocks
        routes = ep.dispatch(layer, h, ids, weights / weights.sum(-1, keepdim=True))
        out = ep.expert_outputs(routes, experts[layer])  # weighted outputs + residual once
        h, plan = ep.combine(layer, out, routes, ticket)  # to each sample's new rank
        labels = ep.move(labels, plan)  # per-sample tensors follow their samples
    loss = torch.nn.functional.cross_entropy(head(h), labels.reshape(-1), reduction="sum")
    (loss / (NODES * GPUS * N * S)).backward()  # then all-reduce the replicated gradients
    print(f"rank {rank}: loss {loss.item():.3f}, placement {ep.placement.stats.plans} plans, "
          f"{ep.placement.stats.fallbacks} fallbacks", flush=True)
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

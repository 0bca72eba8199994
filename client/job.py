"""A training job's sizes, stated once: the dispatcher's layout, the service's spec, the rank's
stream and its placement hook all derive from them.

    shape = JobShape(nodes=2, gpus_per_node=2, experts=8, samples_per_device=2, seq_len=8,
                     hidden_size=16)
    ep = shape.expert_parallel(device, "host:50051", "my-job")  # or no address: home placement
    ...
    ep.close(unregister=device == 0)  # after every rank's last step

``ep_size`` (nodes x gpus_per_node) is the expert-parallel group's size and ``device`` the
rank's device in it, as everywhere in netmoe.client (torch.distributed's global rank and world
size differ from them when a job has several expert-parallel groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from netmoe.checks import positive_int
from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.layer import ExpertParallel
from netmoe.client.placement_client import PlacementClient, job_spec
from netmoe.client.planning import Placement
from netmoe.protos import placement_pb2 as pb

DEADLINE_MS = 50  # the service's per-round deadline unless a job says otherwise


@dataclass(frozen=True)
class JobShape:
    """The sizes of an expert-parallel job: nodes x gpus_per_node devices, experts per MoE layer,
    samples_per_device sequences of seq_len tokens per rank, hidden states of hidden_size x
    dtype_bytes per token (bf16: 2), the service's per-round deadline."""

    nodes: int
    gpus_per_node: int
    experts: int
    samples_per_device: int
    seq_len: int
    hidden_size: int
    dtype_bytes: int = 2
    deadline_ms: int = DEADLINE_MS

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "experts", "samples_per_device", "seq_len",
                     "hidden_size", "dtype_bytes", "deadline_ms"):
            positive_int(name, getattr(self, name))
        if self.experts % self.ep_size:
            raise ValueError(f"experts={self.experts} is not divisible by the group's "
                             f"{self.ep_size} devices (nodes x gpus_per_node)")

    @property
    def ep_size(self) -> int:
        """Devices of the expert-parallel group."""
        return self.nodes * self.gpus_per_node

    def layout(self, device: int) -> Layout:
        """The dispatcher's layout on device ``device`` of the group."""
        return Layout(device, self.ep_size, self.gpus_per_node, self.experts,
                      self.samples_per_device, self.seq_len)

    def spec(self, **options: Any) -> pb.JobSpec:
        """The service's job spec; options: ``job_spec``'s other keywords (objective, layers,
        device_counts, bandwidths, ...). A JobShape is one expert-parallel group, its device
        index the rank the service knows: a job of several groups (``ep_size``, ``groups``)
        builds its spec with ``job_spec`` and each rank's stream with its global rank."""
        for name in ("ep_size", "groups"):
            if options.get(name):
                raise ValueError(
                    f"{name}={options[name]!r}: a JobShape states one expert-parallel group of "
                    f"{self.ep_size} devices; for several groups build the spec with job_spec "
                    f"and each PlacementClient with the rank's global rank")
        return job_spec(self.nodes, self.gpus_per_node, self.experts, self.samples_per_device,
                        hidden_size=self.hidden_size, dtype_bytes=self.dtype_bytes,
                        deadline_ms=self.deadline_ms, **options)

    def expert_parallel(self, device: int, address: str | None = None, job: str = "", *,
                        group: Any = None, timeout: float | None = None,
                        spec_options: dict[str, Any] | None = None,
                        **client_options: Any) -> ExpertParallel:
        """Device ``device``'s ExpertParallel: home placement without an address; else its stream
        to the service at address for job id ``job`` (``PlacementClient``; client_options: its
        keywords) and the placement hook (timeout: None derives it from the deadline,
        ``netmoe.client.planning.timeout_for``). group: the expert-parallel process group
        (None: the default group)."""
        dispatcher = TokenDispatcher(self.layout(device), group=group)
        if address is None:
            return ExpertParallel(dispatcher)
        if not job:
            raise ValueError("job must name the job (its id on the service) with an address")
        client = PlacementClient(address, job, device, self.spec(**(spec_options or {})),
                                 **client_options)
        return ExpertParallel(dispatcher, Placement(client, device, self.ep_size,
                                                    self.samples_per_device, timeout))

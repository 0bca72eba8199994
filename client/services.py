"""A placement service per expert-parallel group, found through the job's torch.distributed store.

Groups never share a round, so nothing needs them in one service process: a job may name one
service per group (or per set of groups). The natural deployment is the sidecar of each group's
first node. Its first rank publishes the address of its own node's sidecar under the group's key
in the job's store (``publish``); every rank of the group reads it there (``discover``) and
streams to that service only, node reports included, so no rank is configured by hand.

Every service is registered with the job's whole spec (its layout of groups is one small
message); a service opens rounds, windows and solves only for the groups whose ranks report to
it, so its work does not grow with the groups it does not serve.

A group whose service cannot be found (its first rank has none, the entry is not an address, two
services claim it, it never appears) gets an ``Unserved`` source: its rounds fall back to "no
move" with that reason, training goes on at the current placement, and other groups are not
affected (their rounds are theirs alone, ``netmoe.client.planning.agree``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from netmoe.round import RankPlan, RoundCounts

if TYPE_CHECKING:
    from netmoe.client.placement_client import PlacementClient

log = logging.getLogger(__name__)

# What a group's first rank publishes when its node has no sidecar.
NONE = "none"
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})$")


def check_address(name: str, value: str) -> str:
    """value if it is host:port (a DNS name, IPv4 or [IPv6] host, port 1-65535); ValueError
    naming name and value otherwise."""
    m = _ADDRESS.match(value) if isinstance(value, str) else None
    if m is None or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"{name} must be host:port, got {value!r}")
    return value


def key(job: str, group: int) -> str:
    """The store key of a group's service address; the job id keeps jobs sharing a store apart."""
    return f"netmoe/{job}/service/{group}"


def assign(claims: Iterable[tuple[str, Sequence[int]]], groups: int, name: str = "services"
           ) -> dict[int, str]:
    """{group: address} from (address, the groups it serves) claims: every group in [0, groups)
    served by exactly one service. ValueError naming ``name``, the group and both addresses when
    two services claim one group, a group out of range or left without a service, or an address
    that is not host:port."""
    out: dict[int, str] = {}
    for address, served in claims:
        check_address(name, address)
        for g in served:
            if not 0 <= g < groups:
                raise ValueError(f"{name}: {address} claims group {g}, outside [0, {groups})")
            if g in out:
                raise ValueError(f"{name}: two services claim group {g}: {out[g]} and {address}")
            out[g] = address
    missing = [g for g in range(groups) if g not in out]
    if missing:
        raise ValueError(f"{name}: groups {missing} have no service (of groups [0, {groups}))")
    return out


def round_robin(addresses: Sequence[str], groups: int) -> dict[int, str]:
    """Group g to addresses[g % len(addresses)]; ValueError when there are more addresses than
    groups (a service would have none) or one is not host:port."""
    if not addresses or len(addresses) > groups:
        raise ValueError(f"services: {len(addresses)} services for {groups} groups (need 1 to "
                         f"{groups})")
    return assign([(a, range(k, groups, len(addresses))) for k, a in enumerate(addresses)], groups)


@dataclass(frozen=True)
class Found:
    """A group's service: its address, or None and why there is none."""

    address: str | None
    reason: str = ""


def publish(store: Any, job: str, group: int, address: str | None) -> Found:
    """The group's first rank: publishes its node's sidecar address (None: it has none) under the
    group's key, unless another value is there already (two services claim the group: Found
    names both, and this rank's group falls back). store: a torch.distributed Store."""
    mine = NONE if address is None else check_address("sidecar address", address)
    # compare_set writes only where the key is absent: a second claim cannot overwrite the first.
    there = store.compare_set(key(job, group), "", mine).decode(errors="replace")
    if there != mine:
        return Found(None, f"two services claim group {group}: {there!r} in the store and "
                           f"{mine!r} of its first rank")
    return _read(group, there)


def discover(store: Any, job: str, group: int, timeout: float) -> Found:
    """A group's service from the store, waiting up to timeout seconds for its first rank to
    publish it."""
    k = key(job, group)
    try:
        store.wait([k], timedelta(seconds=timeout))
    except RuntimeError:  # torch raises DistStoreError (a RuntimeError) on timeout
        return Found(None, f"no service published for group {group} within {timeout:g} s")
    return _read(group, store.get(k).decode(errors="replace"))


def _read(group: int, value: str) -> Found:
    if value == NONE:
        return Found(None, f"group {group} has no service (its first rank has no sidecar)")
    try:
        return Found(check_address("store entry", value))
    except ValueError:
        return Found(None, f"the store entry of group {group} is not an address: {value!r}")


class Unserved:
    """The plan source of a group without a service: every round falls back with the reason.
    spec: the job's spec (its deadline and device_counts, as a ``PlacementClient``'s)."""

    def __init__(self, spec: Any, reason: str) -> None:
        self.spec, self.reason = spec, reason
        self.device_counts = bool(spec.device_counts)

    def submit(self, step: int, layer: int, counts: RoundCounts, micro_batch: int = 0
               ) -> Future[RankPlan | None]:
        fut: Future[RankPlan | None] = Future()
        fut.set_exception(ConnectionError(self.reason))
        return fut

    def close(self, unregister: bool = False) -> None:
        """Nothing to end (the same call as a ``PlacementClient``'s)."""


def group_source(found: Found, job: str, rank: int, spec: Any, **client_options: Any
                 ) -> PlacementClient | Unserved:
    """The rank's plan source: a ``PlacementClient`` of its group's service (client_options: its
    keywords, e.g. ``ranks`` for node reports), or an ``Unserved`` one naming why there is none
    (logged once per rank)."""
    if found.address is None:
        log.warning("rank %d: placement off for its group (%s); training goes on at the current "
                    "placement", rank, found.reason)
        return Unserved(spec, found.reason)
    # Imported here: the planning layer needs torch, the sidecar image (which runs the bench
    # and reads round_robin) has none.
    from netmoe.client.placement_client import PlacementClient

    return PlacementClient(found.address, job, rank, spec, **client_options)

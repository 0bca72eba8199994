"""A service per EP group: the address map, and discovery through a real torch.distributed store."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from torch.distributed import TCPStore

from netmoe.client.planning import Placement
from netmoe.client.services import (
    Unserved,
    assign,
    check_address,
    discover,
    key,
    publish,
    round_robin,
)
from netmoe.protos.convert import job_spec


@pytest.fixture
def store() -> Iterator[TCPStore]:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server


@pytest.mark.parametrize("value", ["10.0.0.7:50051", "node-3.job.svc:50051", "[::1]:7",
                                   "localhost:65535"])
def test_addresses_pass(value: str) -> None:
    assert check_address("x", value) == value


@pytest.mark.parametrize("value", ["", "10.0.0.7", ":50051", "host:0", "host:65536",
                                   "two words:1", "http://h:1"])
def test_non_addresses_are_named(value: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"sidecars[2] must be host:port, got "
                                                   f"{value!r}")):
        check_address("sidecars[2]", value)


def test_round_robin_and_claims() -> None:
    assert round_robin(["a:1", "b:2"], 5) == {0: "a:1", 1: "b:2", 2: "a:1", 3: "b:2", 4: "a:1"}
    assert assign([("a:1", [1]), ("b:2", [0, 2])], 3) == {0: "b:2", 1: "a:1", 2: "b:2"}


@pytest.mark.parametrize(("call", "message"), [
    (lambda: assign([("a:1", [0, 1]), ("b:2", [1])], 2),
     "services: two services claim group 1: a:1 and b:2"),
    (lambda: assign([("a:1", [0, 2])], 2), "services: a:1 claims group 2, outside [0, 2)"),
    (lambda: assign([("a:1", [0])], 3), "services: groups [1, 2] have no service"),
    (lambda: round_robin(["a:1", "b:2", "c:3"], 2), "services: 3 services for 2 groups"),
    (lambda: round_robin(["a:1", "nope"], 2), "services must be host:port, got 'nope'"),
])
def test_inconsistent_maps_name_the_values(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        call()  # type: ignore[operator]


def test_first_rank_publishes_and_the_group_finds_it(store: TCPStore) -> None:
    assert publish(store, "job", 1, "10.0.0.7:50051").address == "10.0.0.7:50051"
    assert discover(store, "job", 1, timeout=5).address == "10.0.0.7:50051"
    # Publishing the same again (a restarted first rank) is no second claim.
    assert publish(store, "job", 1, "10.0.0.7:50051").address == "10.0.0.7:50051"
    # Another job's keys are its own.
    assert discover(store, "other", 1, timeout=0.2).reason == (
        "no service published for group 1 within 0.2 s")


def test_each_bad_entry_falls_back_with_its_reason(store: TCPStore) -> None:
    assert publish(store, "job", 0, "10.0.0.7:50051").address == "10.0.0.7:50051"
    second = publish(store, "job", 0, "10.0.0.8:50051")
    assert second.address is None
    assert second.reason == ("two services claim group 0: '10.0.0.7:50051' in the store and "
                             "'10.0.0.8:50051' of its first rank")
    assert publish(store, "job", 1, None).reason == (
        "group 1 has no service (its first rank has no sidecar)")
    assert discover(store, "job", 1, timeout=5).address is None
    store.set(key("job", 2), "garbage\x00")
    assert discover(store, "job", 2, timeout=5).reason == (
        "the store entry of group 2 is not an address: 'garbage\\x00'")
    # Group 0's address is still there for its other ranks.
    assert discover(store, "job", 0, timeout=5).address == "10.0.0.7:50051"


def test_an_unserved_group_falls_back_every_round_naming_the_reason() -> None:
    src = Unserved(job_spec(1, 2, 8, 2, hidden_size=16, device_counts=True),
                   "group 1 has no service (its first rank has no sidecar)")
    assert src.device_counts
    placement = Placement(src, 0, 2, 2)  # the timeout from the spec's deadline, as for a client
    assert placement.device_counts
    for layer in range(2):
        ticket = placement.submit(0, layer, torch.zeros(2, 2, dtype=torch.int64), None)
        offer = placement.wait(ticket)
        # Both devices' offers, as the combine's control exchange carries them.
        plan = offer.settle(torch.stack([offer.offer(), offer.offer()]), 0.0)
        assert plan.moved == 0
    assert placement.stats.fallbacks == 2 and placement.stats.plans == 0
    assert placement.stats.reasons == {
        "no service: group 1 has no service (its first rank has no sidecar)": 2}
    src.close(unregister=True)  # nothing to end, the same call as a PlacementClient's

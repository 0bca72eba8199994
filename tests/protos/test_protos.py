"""The committed generated code is exactly what the pinned grpcio-tools produces from the proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from netmoe.protos import generate

pytest.importorskip("grpc_tools")


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.OUTPUTS)
    for path in written:
        committed = generate.PROTO_ROOT / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs from freshly generated code; run python -m netmoe.protos.generate"
        )


def test_grpc_module_imports_messages_relatively() -> None:
    from netmoe.protos import placement_pb2, placement_pb2_grpc

    text = (generate.PROTO_ROOT / "placement_pb2_grpc.py").read_text()
    assert "from . import placement_pb2" in text
    assert placement_pb2_grpc.netmoe_dot_v1_dot_placement__pb2 is placement_pb2
    assert placement_pb2.DESCRIPTOR.services_by_name["PlacementService"].full_name == (
        "netmoe.v1.PlacementService"
    )


def test_proto_source_ships_in_package() -> None:
    assert (generate.PROTO_ROOT / generate.PROTO).is_file()

"""The folders are layers and imports only go down them (docs/architecture.md): the core imports
nothing else, the solver and the contract only the core, the client never the solver or the
server (a trainer runs without OR-Tools), and nothing but the application imports the application.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (its package, the packages it may import besides itself and the core)
LAYERS = {
    "netmoe": ("netmoe", set()),
    "solver": ("netmoe.solver", set()),
    "protos": ("netmoe.protos", set()),
    "server": ("netmoe.server", {"netmoe.solver", "netmoe.protos"}),
    "client": ("netmoe.client", {"netmoe.protos"}),
}
PARTS = {"netmoe.solver", "netmoe.protos", "netmoe.server", "netmoe.client", "netmoe.app"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {n for n in names if n == "netmoe" or n.startswith("netmoe.")}


def part(module: str) -> str:
    """The part a netmoe module belongs to: netmoe.server.rounds -> netmoe.server; the core's
    modules (netmoe.round, netmoe.trace, ...) -> netmoe."""
    top = ".".join(module.split(".")[:2])
    return top if top in PARTS else "netmoe"


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_go_down_the_layers(folder: str) -> None:
    own, allowed = LAYERS[folder]
    allowed = allowed | {own, "netmoe"}
    wrong = [f"{path.relative_to(ROOT)} imports {name}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             for name in sorted(imported(path)) if part(name) not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_package_folder() -> None:
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders == set(LAYERS) | {"app"}

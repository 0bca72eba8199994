"""The folders are layers and imports only go down them (docs/architecture.md): the core imports
nothing else, the solver and the contract only the core, the client never the solver or the
server (a trainer runs without OR-Tools), and nothing but the application imports the application.

One exception, written here: the wire's one conversion module (``protos/convert.py``) converts
into the server's own types (a job's spec, a received report) in the functions the servicer
calls, and imports them inside those functions (or for type checking only), so importing the
contract, as the client does, never loads the server or OR-Tools.
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
# folder -> the packages it may import only inside a function or for type checking
LAZY = {"protos": {"netmoe.server", "netmoe.solver"}}
PARTS = {"netmoe.solver", "netmoe.protos", "netmoe.server", "netmoe.client", "netmoe.app"}


def _names(nodes: list[ast.stmt]) -> set[str]:
    names = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and not sub.level:
                names.add(sub.module)
    return {n for n in names if n == "netmoe" or n.startswith("netmoe.")}


def imported(path: Path) -> tuple[set[str], set[str]]:
    """(netmoe modules imported when the module is imported, those imported only inside a
    function or under ``if TYPE_CHECKING:``)."""
    eager: list[ast.stmt] = []
    lazy: list[ast.stmt] = []

    def split(body: list[ast.stmt]) -> None:
        for n in body:
            if isinstance(n, ast.ClassDef):
                split(n.body)
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                    isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"):
                lazy.append(n)
            else:
                eager.append(n)

    split(ast.parse(path.read_text(), str(path)).body)
    now = _names(eager)
    return now, _names(lazy) - now


def part(module: str) -> str:
    """The part a netmoe module belongs to: netmoe.server.rounds -> netmoe.server; the core's
    modules (netmoe.round, netmoe.trace, ...) -> netmoe."""
    top = ".".join(module.split(".")[:2])
    return top if top in PARTS else "netmoe"


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_go_down_the_layers(folder: str) -> None:
    own, allowed = LAYERS[folder]
    allowed = allowed | {own, "netmoe"}
    wrong = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        eager, lazy = imported(path)
        wrong += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(eager)
                  if part(name) not in allowed]
        wrong += [f"{path.relative_to(ROOT)} imports {name} (in a function)" for name in
                  sorted(lazy) if part(name) not in allowed | LAZY.get(folder, set())]
    assert not wrong, "\n".join(wrong)


def test_the_layers_cover_every_package_folder() -> None:
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders == set(LAYERS) | {"app"}

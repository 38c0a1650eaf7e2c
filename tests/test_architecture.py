"""The package's shape (ARCHITECTURE.md): imports go one way along the data path, with no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "attnbench"
# Each folder may import its own modules and those of folders of a lower rank; folders of the
# same rank never import each other. The faces (cli, testing, tracking) sit above everything.
RANKS = {
    "support": 0, "contract": 1, "settings": 2, "measuring": 3, "storage": 4,
    "execution": 5, "analysis": 5, "presenting": 6,
}
FACES = {"__init__", "__main__", "cli", "testing", "tracking"}
MAX_LINES = 400
# The fork server preloads what the parent's main script (the `attnbench` command) imports, so
# that each worker does not import it again.
FACE_IMPORTS_ALLOWED = {"attnbench.execution.local.forkserver_preload": {"attnbench", "attnbench.cli"}}


def _modules() -> dict[str, Path]:
    return {".".join(("attnbench", *path.relative_to(PACKAGE).with_suffix("").parts)): path
            for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """The attnbench modules a file imports at run time (not under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("attnbench"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("attnbench."))
    modules = _modules()
    return {name.removesuffix(".__init__") for name in found if name in modules or f"{name}.__init__" in modules}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else "face"


def test_every_module_is_in_a_folder_or_is_a_face():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == FACES
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"} == set(RANKS)


@pytest.mark.parametrize("module", sorted(name for name in _modules() if _folder(name) != "face"))
def test_imports_point_down_the_data_path(module):
    mine = _folder(module)
    for imported in _imports(_modules()[module]) - FACE_IMPORTS_ALLOWED.get(module, set()):
        theirs = _folder(imported)
        assert theirs != "face", f"{module} imports the face {imported}"
        assert theirs == mine or RANKS[theirs] < RANKS[mine], f"{module} ({mine}) imports {imported} ({theirs})"


def test_no_import_cycle():
    graph = {name: {i for i in _imports(path) if not i.endswith("attnbench")} for name, path in _modules().items()}
    done: set[str] = set()

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, " -> ".join((*trail[trail.index(node):], node))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            visit(nxt, (*trail, node))
        done.add(node)

    for name in graph:
        visit(name, ())


def test_no_module_is_too_long():
    lengths = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    long = {name: lines for name, lines in lengths.items() if lines > MAX_LINES}
    assert not long

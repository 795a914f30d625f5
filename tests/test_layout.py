"""The street plan: four import roots, rooms that import downward only, a kernel that imports nothing of ours.

A *room* is a top-level package (``fs_app``, ``policy_cache``, ``iot_bridge``) or a subpackage of ``iim``
(``iim.core``, ``iim.scenarios``, ...); ``iim``'s own modules (service, settings, CLI) form the top room.
Imports are read from the source (``ast``), so a cycle closed by an import inside a function counts too.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ROOTS = ("fs_app", "policy_cache", "iot_bridge", "iim")

#: Lower floors first; a room may import only rooms on a lower floor (or itself).
FLOORS: dict[str, int] = {
    "iim.core": 0,
    "policy_cache": 1,
    "fs_app": 2, "iot_bridge": 2, "iim.tts": 2, "iim.keys": 2,
    "iim.connectors": 3, "iim.sms": 3, "iim.supervision": 3,
    "iim.scenarios": 4, "iim.home": 4, "iim.privacy": 4, "iim.linking": 4,
    "iim.admin": 5,
    "iim": 6,
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] not in IMPORT_ROOTS:
        return None
    if parts[0] == "iim" and len(parts) > 1 and (ROOT / "iim" / parts[1]).is_dir():
        return f"iim.{parts[1]}"
    return parts[0]


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _room_edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for root in IMPORT_ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            source = _room(_module_name(path))
            assert source is not None
            for lineno, module in _imports(path):
                target = _room(module)
                if target is not None and target != source:
                    edges[(source, target)].append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    return edges


def test_every_room_has_a_floor() -> None:
    rooms = {_room(_module_name(p)) for root in IMPORT_ROOTS for p in (ROOT / root).rglob("*.py")}
    assert rooms == set(FLOORS)


def test_rooms_import_downward_only() -> None:
    upward = [where for (source, target), wheres in _room_edges().items()
              if FLOORS[target] >= FLOORS[source] for where in wheres]
    assert upward == []


def test_import_graph_between_rooms_is_acyclic() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in _room_edges():
        graph[source].add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(room: str, path: list[str]) -> list[str] | None:
        state[room] = 1
        for nxt in sorted(graph[room]):
            if state.get(nxt) == 1:
                return [*path, room, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, room])):
                return cycle
        state[room] = 2
        return None

    for room in sorted(graph):
        if room not in state:
            assert visit(room, []) is None


def test_kernel_imports_nothing_from_the_project() -> None:
    offending = [f"{path.relative_to(ROOT)}:{lineno} imports {module}"
                 for path in (ROOT / "iim" / "core").rglob("*.py")
                 for lineno, module in _imports(path)
                 if _room(module) not in (None, "iim.core")]
    assert offending == []


def test_production_code_never_imports_the_emulator() -> None:
    offending = [f"{path.relative_to(ROOT)}:{lineno} imports {module}"
                 for root in IMPORT_ROOTS for path in (ROOT / root).rglob("*.py")
                 if "testing" not in path.relative_to(ROOT).parts
                 for lineno, module in _imports(path)
                 if module == "fs_app.testing" or module.startswith("fs_app.testing.")]
    assert offending == []


def test_the_distribution_installs_exactly_the_four_import_roots() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("*/**/__init__.py")
                if ".venv" not in init.parts}
    packages = {p for p in packages if any(fnmatch.fnmatchcase(p, pattern) for pattern in include)}
    assert {p.split(".")[0] for p in packages} == set(IMPORT_ROOTS)
    assert "fs_app.testing" in packages  # the emulator ships: `fs-emulator` is a console script


@pytest.mark.parametrize("folder", ["sip-tests", "fs_app", "dialplan", "freeswitch-conf", "policy_cache",
                                    "iot_bridge", "tests"])
def test_the_design_cards_top_level_folders_exist(folder: str) -> None:
    assert (ROOT / folder).is_dir()


# Tiers that test the whole system against real peers rather than one package.
CROSS_CUTTING_TIERS = {"real_switch_tier"}


def test_tests_mirror_the_packages() -> None:
    """Every test module below ``tests/<room>/`` names a package that exists (no stale folders after a move)."""
    for path in (ROOT / "tests").rglob("test_*.py"):
        folder = path.parent.relative_to(ROOT / "tests")
        if folder.parts and folder.parts[0] not in CROSS_CUTTING_TIERS:
            assert (ROOT / folder).is_dir(), f"{path.relative_to(ROOT)} mirrors no package"

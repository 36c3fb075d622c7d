"""Layers without cycles: every import in src/cocoon against the table in docs/ARCHITECTURE.md.

The table under "## Layers" is the rule: one row per package, top to bottom,
each naming what it may import. This test reads that table (so the document
cannot drift from the code), checks that every row only names rows below it
(so the layers cannot form a cycle), and then checks every import of every
module against its row. Imports inside functions count: an import hidden in a
function is still a dependency, only a later one. ``if TYPE_CHECKING:`` imports
count too: a type named from a package above is a dependency all the same (none
is needed today, so no exception is made for them).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "cocoon"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
#: Not host code: files copied into the guest image as they are (the guest's
#: entry script imports the agent from the image's own copy).
NOT_SCANNED = (SRC / "guestassets" / "data",)

#: Imports by the front ends of packages below ``runtime/``, known and to be removed:
#: (importing module, package). Issue 15 item 1 ("runtime/ is the library") paid
#: every one; nothing may import past its row, and an entry that no longer matches
#: an import fails too, so this list only shrinks.
FRONT_END_DEBTS: set[tuple[str, str]] = set()


def _layer_table() -> list[tuple[str, set[str]]]:
    """(package, what it may import) per row of the "## Layers" table, top row first."""
    text = DOC.read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        (name,) = re.findall(r"`([^`]+)`", cells[0])
        rows.append((name, set(re.findall(r"`([^`]+)`", cells[2]))))
    return rows


def _package_of(module: str) -> str:
    """``cocoon.sandbox.x`` -> ``sandbox/``, ``cocoon.config`` -> ``config``; root: ``cocoon``"""
    parts = module.split(".")
    if len(parts) == 1:
        return "cocoon"
    return parts[1] + "/" if (SRC / parts[1]).is_dir() else parts[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        if any(path.is_relative_to(d) for d in NOT_SCANNED):
            continue
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(cocoon module imported, line) for every import anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # ``from cocoon.x import y``: y is a module of x, or a name in x.
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for name in names:
            if name == "cocoon" or name.startswith("cocoon."):
                while name not in known:
                    name = name.rpartition(".")[0]
                yield name, node.lineno


def _graph() -> dict[str, dict[str, int]]:
    mods = _modules()
    known = set(mods)
    return {m: {t: ln for t, ln in _imports(m, p, known) if t != m} for m, p in mods.items()}


def test_table_names_every_package_once_and_only_rows_below() -> None:
    rows = _layer_table()
    names = [n for n, _ in rows]
    assert len(names) == len(set(names)), names
    present = {_package_of(m) for m in _modules()}
    assert present == set(names), f"table vs src/cocoon: {present ^ set(names)}"
    for i, (name, may) in enumerate(rows):
        below = set(names[i + 1 :])
        assert may <= below, f"{name} may import {sorted(may - below)}: not below it"


def test_no_package_imports_past_its_row() -> None:
    allowed = dict(_layer_table())
    wrong, used = [], set()
    for mod, targets in _graph().items():
        pkg = _package_of(mod)
        for target, line in targets.items():
            dest = _package_of(target)
            if dest == pkg or dest in allowed.get(pkg, set()):
                continue
            if (mod, dest) in FRONT_END_DEBTS:
                used.add((mod, dest))
                continue
            wrong.append(f"{mod}:{line} imports {target} ({pkg} may not import {dest})")
    assert not wrong, "\n".join(wrong)
    assert used == FRONT_END_DEBTS, f"paid off, drop from the list: {FRONT_END_DEBTS - used}"


def test_no_module_import_cycle() -> None:
    """Within packages too: a cycle of modules is a layer that cannot be cut."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_hidden_and_relative_imports(tmp_path: Path) -> None:
    """The scan finds an import inside a function and resolves a relative one."""
    f = tmp_path / "mod.py"
    f.write_text(
        "def late():\n    from cocoon.sandbox import sandbox\n"
        "from ..state import store\nfrom . import scratch\n"
    )
    known = {"cocoon", "cocoon.sandbox", "cocoon.sandbox.sandbox", "cocoon.state"}
    known |= {"cocoon.state.store", "cocoon.storage", "cocoon.storage.scratch"}
    got = dict(_imports("cocoon.storage.mod", f, known))
    assert got == {
        "cocoon.sandbox.sandbox": 2,
        "cocoon.state.store": 3,
        "cocoon.storage.scratch": 4,
    }

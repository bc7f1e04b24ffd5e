"""The import structure: no circles, and no module imports from a floor above its own.

Floors, bottom to top (a module may import its own floor and those below):

0. the ground: ``fedsim`` (version), ``schema``, ``registry``, ``arrays``, ``safe_yaml``,
   ``runlock``, ``outputs``
1. leaf schemas and libraries: ``data.config``, ``data.base``, ``data.partitioners``,
   ``tta.config``, ``tta.corruptions``, ``edge.config``, ``tracking.config``, ``models``
2. the root schema: ``config``
3. data: ``data.*``
4. the engine and its results: ``engine.*``, ``results``, ``report``, ``tracking.*``
5. methods: ``strategies.*``, ``adapters.*``
6. test-time adaptation: ``tta.*``
7. the scenario, validated and built: ``scenario``
8. what runs whole experiments: ``runs``, ``edge.*``, ``superlink.*``, ``sweep``, ``api``
9. the command line: ``cli.*``, ``__main__``

All imports count, function-local ones included (hiding an import in a function does not
hide it from the graph). ``strategies/`` and ``adapters/`` are installed as
``fedsim.strategies`` and ``fedsim.adapters``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fedsim": "fedsim", "strategies": "fedsim.strategies", "adapters": "fedsim.adapters"}
FLOORS: list[tuple[int, tuple[str, ...]]] = [
    (
        0,
        (
            "fedsim",
            "fedsim.schema",
            "fedsim.registry",
            "fedsim.arrays",
            "fedsim.safe_yaml",
            "fedsim.runlock",
            "fedsim.outputs",
            "fedsim.flower_app",
        ),
    ),
    (
        1,
        (
            "fedsim.data.config",
            "fedsim.data.base",
            "fedsim.data.partitioners",
            "fedsim.tta.config",
            "fedsim.tta.corruptions",
            "fedsim.edge.config",
            "fedsim.tracking.config",
            "fedsim.models",
            "fedsim.scenario_file",
        ),
    ),
    (2, ("fedsim.config",)),
    (3, ("fedsim.data",)),
    (4, ("fedsim.engine", "fedsim.results", "fedsim.report", "fedsim.tracking")),
    (5, ("fedsim.strategies", "fedsim.adapters")),
    (6, ("fedsim.tta",)),
    (7, ("fedsim.scenario",)),
    (8, ("fedsim.runs", "fedsim.edge", "fedsim.superlink", "fedsim.sweep", "fedsim.api")),
    (9, ("fedsim.cli", "fedsim.__main__")),
]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def floor(module: str) -> int:
    """The floor of the most specific prefix that names ``module``."""
    best: tuple[int, int] | None = None  # (prefix length, floor)
    for level, prefixes in FLOORS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), level)
    if best is None or (best[0] == len("fedsim") and module != "fedsim"):
        raise AssertionError(f"{module}: on no floor; add it to FLOORS in {Path(__file__).name}")
    return best[1]


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The project modules ``module`` imports, with line numbers (old top-level names mapped)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ("strategies", "adapters"):
                name = "fedsim." + name
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.append((name, node.lineno))
    return found


GRAPH = {m: imports(m, p, set(modules())) for m, p in modules().items()}


def test_every_module_is_on_a_floor() -> None:
    for module in GRAPH:
        floor(module)


def test_no_import_goes_up_a_floor() -> None:
    up = [
        f"{modules()[m].relative_to(ROOT)}:{line}: {m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in GRAPH.items()
        for t, line in targets
        if floor(t) > floor(m) and not t.startswith(m + ".")  # a package may re-export its own modules
    ]
    assert not up, "imports from a higher floor:\n" + "\n".join(up)


def test_no_import_circle() -> None:
    edges = {m: {t for t, _ in targets if not t.startswith(m + ".")} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_the_checker_sees_a_circle_and_an_upward_import() -> None:
    assert floor("fedsim.schema") < floor("fedsim.scenario") < floor("fedsim.cli.run")
    assert floor("fedsim.strategies.fedtiny.server") == 5 and floor("fedsim.tta.config") == 1
    with pytest.raises(AssertionError, match="on no floor"):
        floor("fedsim.nowhere")

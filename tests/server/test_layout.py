"""The folder tree is the architecture: imports point down only, never in a circle, and files stay small.

Layers (docs/ARCHITECTURE.md): config, events, memory <- modeling <- loading, families <- engine
<- api, ui <- server <- cli (app.py). training/ and tools/ sit outside the package and the package
never imports them. Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "autoglm_app"
MAX_LINES = 500  # per file, outside modeling/ (one model, one file, as transformers does)

# what each part of the package may import (its own files always)
ALLOWED = {
    "config": set(),
    "events": set(),
    "memory": set(),
    "modeling": set(),
    "families": {"events", "modeling"},
    "loading": {"config", "events", "memory", "modeling", "families"},
    "engine": {"config", "events", "memory", "modeling", "families", "loading"},
    "api": {"config", "events", "engine"},
    "ui": {"config", "events", "memory", "engine"},
    "seed": {"loading", "modeling"},
    "server": {"config", "engine", "loading", "modeling", "families", "api", "ui"},
    "cli": {"config", "server", "loading"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every autoglm_app / training / tools module this file imports, as dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            for alias in node.names:  # `from . import render` imports the module render
                candidate = f"{target}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (ROOT / Path(*candidate.split(".")) / "__init__.py").exists():
                    found.add(candidate)
    return {m for m in found if m.split(".")[0] in ("autoglm_app", "training", "tools")}


def part(module: str) -> str:
    """autoglm_app.engine.worker -> engine; autoglm_app.config -> config."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in package_files()}
    return {m: {i for i in imports_of(p) if i in files} - {m} for m, p in files.items()}


def test_the_package_never_imports_training_or_tools():
    for path in package_files():
        outside = {m for m in imports_of(path) if not m.startswith("autoglm_app")}
        assert not outside, (path, outside)


def test_imports_point_down_only():
    wrong = []
    for module, targets in graph().items():
        mine = part(module)
        if mine == "":
            continue
        for target in targets:
            theirs = part(target)
            if theirs and theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "upward or sideways imports:\n" + "\n".join(sorted(wrong))


def test_the_import_graph_has_no_circles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_file_outside_modeling_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in package_files()
            if "modeling" not in p.parts and (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, long


def test_the_layer_table_names_every_part_of_the_package():
    parts = {part(module_name(p)) for p in package_files()} - {""}
    assert parts <= set(ALLOWED), parts - set(ALLOWED)


def test_the_page_session_holds_data_and_does_not_import_the_renderer():
    assert "autoglm_app.ui.render" not in imports_of(PACKAGE / "ui" / "session.py")


def test_the_contract_carries_no_callables():
    """events.py is plain data: no field of a request or an event is typed or defaulted as a callable."""
    import dataclasses
    import typing

    from autoglm_app import events

    for name, obj in vars(events).items():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == events.__name__:
            hints = typing.get_type_hints(obj)
            for f in dataclasses.fields(obj):
                assert "Callable" not in str(hints[f.name]), f"{name}.{f.name}: {hints[f.name]}"

"""The package's shape: concerns import each other in one direction only, and the library holds
no AWS Lambda code (that lives in src/handler)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "similarity"


def _unit(module: str) -> str:
    """``similarity.fetch.http`` -> ``fetch``; top-level modules are units of their own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "similarity"


def _imports() -> dict[str, set[str]]:
    """Each unit -> the units its modules import at module level (lazy imports inside functions
    are deliberate: optional dependencies and cold start)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        module = ".".join(parts)
        if module == "similarity":
            continue  # the public facade re-exports everything
        deps = graph.setdefault(_unit(module), set())
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                    names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                elif node.module and node.module.startswith("similarity"):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("similarity")]
            for name in names:
                if name.startswith("similarity.") and _unit(name) != _unit(module):
                    deps.add(_unit(name))
    return graph


def test_no_import_cycles_between_concerns() -> None:
    graph = _imports()
    assert {"backends", "model", "fetch", "io", "pipeline", "jobs", "api", "tools"} <= set(graph)

    def visit(unit: str, path: list[str]) -> None:
        assert unit not in path, f"import cycle: {' -> '.join([*path, unit])}"
        for dep in sorted(graph.get(unit, ())):
            visit(dep, [*path, unit])

    for unit in graph:
        visit(unit, [])


def test_library_has_no_lambda_code() -> None:
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "aws_lambda_powertools" not in text and "lambda_handler" not in text, path

"""The shape the codebase holds to (issue 9): small modules, short functions, one way in to inference.

Ruff's PLR0915 (statements) and C901 (complexity) hold functions from the inside; lines are what a
reader scrolls, so they are counted here. Alembic revisions are declarations of a schema, read
table by table, and are left out. The layering itself is import-linter's job (``.ci/run``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "inference", "training", "migrations")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> Iterator[Path]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "versions" not in path.relative_to(ROOT).parts:
                yield path


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_the_packages_are_found() -> None:
    assert len(list(_modules())) > 100


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_lengths(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.name}: split it along its roles"
    long = [
        f"{f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for f in _functions(ast.parse(text))
        if f.end_lineno is not None and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_node_reaches_inference_through_its_public_surface() -> None:
    """Design: node uses inference through ``inference/__init__``, so the library can move its
    modules without the service noticing."""
    deep = []
    for path in sorted((ROOT / "node").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("inference."):
                deep.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import):
                deep += [
                    f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}"
                    for a in node.names
                    if a.name.startswith("inference.")
                ]
    assert not deep, deep


def test_every_public_inference_name_resolves() -> None:
    import inference

    missing = [name for name in inference.__all__ if getattr(inference, name, None) is None]
    assert not missing

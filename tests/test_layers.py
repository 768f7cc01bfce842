"""The layers import in one direction only: protocol -> reasoning -> engines -> routing -> accounts ->
deployments -> api, cli.

A module may import from its own layer and the layers below it, never above. The check reads the
source (no imports run), so it also catches imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import r1serve

PACKAGE = Path(r1serve.__file__).parent

# Lower numbers sit below higher ones. Shared leaves (errors, settings) are at the bottom.
LAYERS: dict[str, int] = {
    "errors": 0,
    "settings": 0,
    "logs": 0,  # logging set-up and the request id every layer's lines carry
    "protocol": 0,
    "reasoning": 1,
    "toolcalls": 1,  # the tool-call parser, the reasoning parser's sibling
    "models": 1,  # the catalog and fetching weights: data the engines read
    "engines": 2,
    "routing": 3,
    "gateway": 3,  # routes over several engines; builds a ModelRegistry
    "accounts": 4,
    "deployments": 5,  # replicas behind a model group (routing), recorded in the accounts database
    "api": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}


def _layer_of(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _absolute(module_path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a relative ``from .x import y`` names, for a module at ``module_path``."""
    parts = ["r1serve", *module_path.relative_to(PACKAGE).with_suffix("").parts]
    parts.pop()  # a module's package; for __init__, the package it is
    package = parts[: len(parts) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _imported_layers(tree: ast.AST, module_path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module_path, node)
            # "from . import x" imports modules: each name may be one of another layer.
            names = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "r1serve" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops <= set(LAYERS), f"assign a layer to: {sorted(tops - set(LAYERS))}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer_of(path)
        for target in _imported_layers(ast.parse(path.read_text(encoding="utf-8")), path):
            if LAYERS[target] > LAYERS[own]:
                violations.append(f"{path.relative_to(PACKAGE)} ({own}) imports r1serve.{target}")
    assert not violations, "\n".join(violations)


def test_relative_imports_are_resolved() -> None:
    """A relative import is checked as the absolute one it stands for (here: engines importing api)."""
    tree = ast.parse("from ..api import app\nfrom . import base\nfrom .metrics import x\n")
    assert _imported_layers(tree, PACKAGE / "engines" / "llama.py") == {"api", "engines"}
    assert _imported_layers(ast.parse("from .limiter import x\n"), PACKAGE / "accounts" / "__init__.py") == {"accounts"}

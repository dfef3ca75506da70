"""The folders are floors: `common/` is the ground, `server/` and `client/` stand side by side
on it, `simulation/` on top. Every import statement (and every `importlib.import_module` of a
literal name) is parsed, and any that reaches up or sideways fails naming file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("common", "client", "server", "simulation")
# What each folder may import from the project.
ALLOWED = {
    "common": {"common"},
    "client": {"common", "client"},
    "server": {"common", "server"},
    "simulation": {"common", "client", "server", "simulation"},
}
# The one documented place that reaches up: the CLI lists every folder's commands by name.
REACHES_UP = {("common/cli.py", "server.cli"), ("common/cli.py", "client.cli"),
              ("common/cli.py", "simulation.cli")}


def imported_modules(tree: ast.AST):
    """(line, dotted module name) of every absolute import and literal import_module call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            # `from client import task` names a project module too
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            for line, module in imported_modules(tree):
                top = module.split(".")[0]
                if top in LAYERS and top not in ALLOWED[layer]:
                    if (rel, module) in REACHES_UP:
                        continue
                    out.append(f"{rel}:{line}: {layer}/ imports {module}")
    return out


def test_no_layer_imports_up_or_sideways():
    found = violations()
    assert not found, "imports that break the layers:\n" + "\n".join(sorted(set(found)))


def test_the_check_catches_an_upward_and_a_sideways_import(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "common" / "bad.py").write_text("from simulation.splits import split_records\n")
    (tmp_path / "server" / "bad.py").write_text(
        "import os\n\ndef f():\n    from client.protocol import Candidate\n"
    )
    (tmp_path / "client" / "ok.py").write_text("from common.protocol import Candidate\n")
    (tmp_path / "common" / "dyn.py").write_text(
        "import importlib\nimportlib.import_module('server.recipe')\n"
    )
    found = sorted(set(violations(tmp_path)))
    assert found == [
        "common/bad.py:1: common/ imports simulation.splits",
        "common/bad.py:1: common/ imports simulation.splits.split_records",
        "common/dyn.py:2: common/ imports server.recipe",
        "server/bad.py:4: server/ imports client.protocol",
        "server/bad.py:4: server/ imports client.protocol.Candidate",
    ]


@pytest.mark.parametrize("module", ["server.cli", "client.cli", "simulation.cli"])
def test_each_folder_registers_its_commands_through_one_module(module):
    import importlib

    assert callable(importlib.import_module(module).register)

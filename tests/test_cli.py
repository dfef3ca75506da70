"""The command line: every command is registered, and `--help` imports nothing heavy."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "flwr", "sklearn", "matplotlib", "ray")


def test_cli_import_pulls_in_no_heavy_package():
    probe = (
        "import sys, common.cli; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing the CLI loaded heavy packages: {out}"


def test_every_command_is_registered():
    from typer.testing import CliRunner

    from common.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("merge", "score", "simulate", "demo-parents", "certs", "coordinator", "node"):
        assert command in result.output, f"`fedmerge {command}` missing from --help"

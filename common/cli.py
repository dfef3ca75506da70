"""The `fedmerge` command line.

Each package contributes its commands through a `register(app)` function in a module whose
top level imports nothing heavy, so `fedmerge --help` stays fast; torch, transformers and
flwr are imported inside the commands that need them.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = (
    "common.merge_cli",
    "common.score_cli",
    "simulation.cli",
    "simulation.demo_cli",
    "server.deploy_cli",
    "client.node_cli",
)

app = typer.Typer(
    name="fedmerge",
    no_args_is_help=True,
    add_completion=False,
    help="Federated merge-tuning of clinical language models: pick the merge coefficient "
    "by pooled AUROC across hospitals, without moving patient data.",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    from common.errors import FedmergeError

    try:
        app()
    except FedmergeError as exc:
        # Bad input is the user's to fix: one clear line, no traceback, a non-zero exit.
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""The hospital's commands: `fedmerge node dry-run|start` and `fedmerge certs node`.

Top-level imports stay light so `fedmerge --help` does not import torch or flwr.
"""

from __future__ import annotations

from pathlib import Path

import typer

node_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    no_args_is_help=True,
    help="Hospital node: check the node file locally, then start the SuperNode.",
)


@node_app.command("dry-run")
def dry_run_cmd(
    node_file: Path = typer.Argument(..., help="The node file (YAML: connection + node)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Validate the node file, load data and parents, print counts and fingerprints (offline)."""
    from rich.console import Console
    from rich.table import Table

    from client.dry_run import dry_run

    with Console(stderr=True).status("loading data and parents (no network)..."):
        report = dry_run(node_file)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    table = Table(title=f"node {report.site} — dry run, nothing was sent", show_header=False)
    table.add_row("data", report.data)
    table.add_row("records", f"{report.records} ({report.positives} positive)")
    for f in report.folds:
        table.add_row(f"fold {f.fold}", f"{f.records} ({f.positives} positive)")
    table.add_row("parent A", f"{report.parent_a}\nsha256 {report.parent_a_sha256}")
    table.add_row("parent B", f"{report.parent_b}\nsha256 {report.parent_b_sha256}")
    table.add_row("parameters", f"{report.parameters:,}")
    table.add_row("SuperLink", report.superlink)
    table.add_row("CA", f"{report.ca_subject} (until {report.ca_not_after})")
    table.add_row("node key", report.node_key_fingerprint)
    Console().print(table)
    typer.echo("`fedmerge node start` would run:")
    for cmd in report.commands:
        typer.echo(f"$ {cmd}")
    for w in report.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)


@node_app.command("ledger")
def ledger_cmd(
    node_file: Path = typer.Argument(..., help="The node file (YAML: connection + node)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per release."),
) -> None:
    """Show this hospital's release ledger: every sum it took part in (no counts)."""
    import datetime

    from client.ledger import ReleaseLedger
    from client.node_config import parse_node_config
    from client.node_file import load_node_file, node_config_values
    from common.errors import FedmergeError

    cfg = parse_node_config(node_config_values(load_node_file(node_file)), source=str(node_file))
    if cfg.ledger is None:
        raise FedmergeError(f"{node_file}: field 'node.ledger': not set; expected a file path")
    entries = ReleaseLedger(cfg.ledger).entries()
    if as_json:
        for e in entries:
            typer.echo(e.model_dump_json())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"release ledger {cfg.ledger} ({len(entries)} releases)")
    for col in ("time (UTC)", "run", "round", "stage", "fold", "seed", "sites", "candidates",
                "terms"):
        table.add_column(col)
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.time, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        table.add_row(when, str(e.run), str(e.round), e.stage, f"{e.fold}/{e.folds}",
                      str(e.fold_seed), str(e.sites), str(len(e.candidates)), e.terms[:12])
    Console().print(table)


@node_app.command("start")
def start_cmd(
    node_file: Path = typer.Argument(..., help="The node file (YAML: connection + node)."),
    print_only: bool = typer.Option(False, "--print-only", help="Print, do not run."),
    log_dir: Path = typer.Option(Path("node-logs"), "--log-dir"),
) -> None:
    """Start this hospital's SuperNode (and its persistent ClientApp worker); Ctrl-C stops."""
    import time

    from client.node_file import child_env, load_node_file, node_commands, node_config_values
    from common.flower_runtime import shell_line
    from common.processes import proc_set

    nf = load_node_file(node_file)
    commands = node_commands(nf.connection, node_config_values(nf))
    for _, argv in commands:
        typer.echo(f"$ {shell_line(argv)}")
    if print_only:
        return
    env = child_env(nf.connection)
    with proc_set() as procs:
        started = [
            procs.start(name, argv, env=env, log_path=log_dir / f"{name}.log")
            for name, argv in commands
        ]
        typer.echo(f"running; logs in {log_dir}/ (Ctrl-C to stop)")
        try:
            while all(p.poll() is None for p in started):
                time.sleep(1.0)
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
        dead = next(p for p in started if p.poll() is not None)
        typer.secho(
            f"{dead.name} exited with {dead.poll()}; last log lines:\n"
            + "\n".join(dead.log_text().splitlines()[-15:]),
            fg=typer.colors.RED, err=True,
        )
        raise typer.Exit(1)


def certs_node(
    name: str = typer.Argument(..., help="The hospital's node name, e.g. hospital-a."),
    out: Path = typer.Option(Path("keys"), "--out"),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Create a hospital's node-authentication key pair (run this AT the hospital)."""
    from common.certs import create_node_keys

    files = create_node_keys(out, name, force=force)
    typer.echo(f"private key: {files.private_key}  (mode 0600; never leaves this machine)")
    typer.echo(f"public key:  {files.public_key}  (send to the coordinator)")
    typer.echo(f"fingerprint: {files.fingerprint}  (confirm it with the coordinator)")


def register(app: typer.Typer, certs: typer.Typer) -> None:
    app.add_typer(node_app, name="node")
    certs.command("node")(certs_node)

"""The hospital's commands: `fedmerge node dry-run|start` and `fedmerge certs node`.

Top-level imports stay light so `fedmerge --help` does not import torch or flwr.
"""

from __future__ import annotations

from pathlib import Path

import typer

node_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    no_args_is_help=True,
    help="Hospital node: check the node file locally, start, stop and watch the SuperNode.",
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
    table.add_row("parent A", str(report.parent_a))
    table.add_row("parent B", str(report.parent_b))
    table.add_row("parameters", f"{report.parameters:,}")
    table.add_row("memory", report.memory)
    table.add_row("SuperLink", report.superlink)
    table.add_row("CA", f"{report.ca_subject} (until {report.ca_not_after})")
    table.add_row("node key", report.node_key_fingerprint)
    Console().print(table)
    # Whole, outside the table (which would cut them to the terminal's width with "…"):
    # operators compare them character by character with the coordinator's.
    typer.echo(f"parent A sha256 {report.parent_a_sha256}")
    typer.echo(f"parent B sha256 {report.parent_b_sha256}")
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
    """Show this hospital's release ledger: every sum it took part in (no counts); a
    "summed" line is the size of a sum as its UNMASK settled it."""
    import datetime

    from client.ledger import ReleaseLedger, epsilon_spent
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

    releases = sum(1 for e in entries if e.kind == "release")
    table = Table(title=f"release ledger {cfg.ledger} ({releases} releases)")
    for col in ("time (UTC)", "run", "round", "stage", "fold", "seed", "sites", "candidates",
                "zCDP ρ", "terms"):
        table.add_column(col)
    for e in entries:
        when = datetime.datetime.fromtimestamp(e.time, datetime.UTC).strftime("%Y-%m-%d %H:%M")
        stage = e.stage if e.kind == "release" else f"{e.stage}: summed"
        table.add_row(when, str(e.run), str(e.round), stage, f"{e.fold}/{e.folds}",
                      str(e.fold_seed), str(e.sites), str(len(e.candidates)),
                      f"{e.rho:.4g}" if e.rho else "—", e.terms[:12])
    console = Console()
    console.print(table)
    privacy = cfg.policy.privacy
    spent = epsilon_spent(entries, privacy.max_delta)
    console.print(
        f"privacy budget: ε spent {spent:.3g} of {privacy.max_epsilon_total:g} "
        f"(δ = {privacy.max_delta:.0e}; every noisy release composed, PLD accountant)"
    )


@node_app.command("start")
def start_cmd(
    node_file: Path = typer.Argument(..., help="The node file (YAML: connection + node)."),
    print_only: bool = typer.Option(False, "--print-only", help="Print, do not run."),
) -> None:
    """Start this hospital's SuperNode and worker; SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop
    both. PID file, status and logs: the node file's `service.dir` (default node-state/)."""
    from client.node_service import run_node

    code = run_node(node_file, typer.echo, print_only=print_only)
    if code:
        raise typer.Exit(code)


@node_app.command("stop")
def stop_cmd(
    node_file: Path = typer.Argument(..., help="The node file the node was started with."),
) -> None:
    """Stop the node started from NODE_FILE (its SuperNode and worker) and wait for it."""
    from client.node_service import stop_node

    pid = stop_node(node_file)
    typer.echo("no node was running from this node file" if pid is None
               else f"stopped the node (pid {pid}) and its SuperNode and worker")


@node_app.command("status")
def status_cmd(
    node_file: Path = typer.Argument(..., help="The node file the node was started with."),
    runs: int = typer.Option(5, "--runs", min=1, max=1000, help="How many recent runs."),
    as_json: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """Connected or not (and why), the last runs (accepted, refused and by which rule,
    finished) and the release ledger's summary; exit code 0 when connected, 3 when not."""
    from client.node_service import dump, node_report, report_lines

    report = node_report(node_file, runs)
    typer.echo(dump(report) if as_json else "\n".join(report_lines(report)))
    connected = report.running and report.status is not None and (
        report.status.state == "connected"
    )
    if not connected:
        raise typer.Exit(3)


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

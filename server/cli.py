"""The coordinator's commands: `fedmerge certs ca|server` and `fedmerge coordinator ...`.

Every command that runs Flower prints the exact command first (and `--print-only` stops
there), so an operator can audit or reproduce it by hand. Top-level imports stay light:
`fedmerge --help` must not import flwr or cryptography.
"""

from __future__ import annotations

from pathlib import Path

import typer

coord_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    no_args_is_help=True,
    help="Coordinator: run the SuperLink, register hospital keys, submit tuning runs.",
)

DEFAULT_CERTS = Path("certs")
DEFAULT_CONNECTION = "fedmerge"


def _echo_cmd(argv: list[str]) -> None:
    from common.flower_runtime import shell_line

    typer.echo(f"$ {shell_line(argv)}")


def _run_foreground(argv: list[str], env: dict[str, str]) -> None:
    """Run until it exits or Ctrl-C; its whole process group goes with it either way."""
    import subprocess

    from common.errors import FedmergeError

    try:
        rc = subprocess.call(argv, env=env)
    except FileNotFoundError:
        raise FedmergeError(
            f"{argv[0]}: not found on PATH (install fedmerge's environment)"
        ) from None
    except KeyboardInterrupt:
        rc = 130
    if rc:
        raise typer.Exit(rc)


def certs_ca(
    out: Path = typer.Option(DEFAULT_CERTS, "--out", help="Directory for ca.pem and ca.key."),
    common_name: str = typer.Option("fedmerge deployment CA", "--common-name"),
    days: int = typer.Option(3650, "--days", min=1),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Create the deployment's private CA (keep ca.key offline; share ca.pem with hospitals)."""
    from common.certs import create_ca

    files = create_ca(out, common_name=common_name, days=days, force=force)
    typer.echo(f"CA certificate: {files.cert}  (give this to every hospital)")
    typer.echo(f"CA private key: {files.key}  (mode 0600; keep it off the SuperLink host)")


def certs_server(
    name: str = typer.Option("superlink", "--name", help="File stem: NAME.pem and NAME.key."),
    san: list[str] = typer.Option(
        ..., "--san", help="Address hospitals dial, IP:1.2.3.4 or DNS:host; repeatable."
    ),
    ca_dir: Path = typer.Option(DEFAULT_CERTS, "--ca-dir", help="Where ca.pem/ca.key are."),
    out: Path = typer.Option(DEFAULT_CERTS, "--out"),
    days: int = typer.Option(825, "--days", min=1),
    force: bool = typer.Option(False, "--force", help="Replace existing files."),
) -> None:
    """Create the SuperLink's TLS certificate, signed by the CA, valid for every --san."""
    from common.certs import create_server_cert

    files = create_server_cert(ca_dir, out, name=name, sans=san, days=days, force=force)
    typer.echo(f"server certificate: {files.cert}  SANs: {', '.join(files.sans)}")
    typer.echo(f"server private key: {files.key}  (mode 0600)")


@coord_app.command("start-superlink")
def start_superlink(
    certs: Path = typer.Option(DEFAULT_CERTS, "--certs", help="Directory with ca.pem etc."),
    name: str = typer.Option("superlink", "--name", help="Server certificate stem."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to listen on (hospitals must reach it)."
    ),
    port: int = typer.Option(9093, "--port", min=1, max=65535),
    address: str = typer.Option(
        None, "--address", help="HOST:PORT the flwr CLI uses (default 127.0.0.1:PORT)."
    ),
    database: Path = typer.Option(None, "--database", help="SQLite state file (default RAM)."),
    connection: str = typer.Option(DEFAULT_CONNECTION, "--connection"),
    flwr_home: Path = typer.Option(None, "--flwr-home", envvar="FLWR_HOME"),
    print_only: bool = typer.Option(False, "--print-only", help="Print, do not run."),
) -> None:
    """Start the SuperLink with TLS and node authentication, and record the CLI connection."""
    from common.flower_runtime import flower_env
    from server.deployment import superlink_argv, write_connection

    argv = superlink_argv(
        ca=certs / "ca.pem", cert=certs / f"{name}.pem", key=certs / f"{name}.key",
        host=host, port=port, database=database,
    )
    home = flwr_home or Path.home() / ".flwr"
    cfg = write_connection(
        home, connection, address=address or f"127.0.0.1:{port}",
        root_certificates=certs / "ca.pem",
    )
    typer.echo(f"connection '{connection}' written to {cfg}")
    _echo_cmd(argv)
    if not print_only:
        _run_foreground(argv, flower_env(home))


@coord_app.command("connect")
def connect(
    address: str = typer.Option(..., "--address", help="SuperLink HOST:PORT."),
    ca: Path = typer.Option(DEFAULT_CERTS / "ca.pem", "--ca"),
    connection: str = typer.Option(DEFAULT_CONNECTION, "--connection"),
    flwr_home: Path = typer.Option(None, "--flwr-home", envvar="FLWR_HOME"),
) -> None:
    """Record how the flwr CLI reaches a SuperLink (when it runs elsewhere)."""
    from common.errors import FedmergeError
    from server.deployment import write_connection

    if not ca.is_file():
        raise FedmergeError(f"--ca {ca}: file not found")
    cfg = write_connection(
        flwr_home or Path.home() / ".flwr", connection, address=address, root_certificates=ca
    )
    typer.echo(f"connection '{connection}' -> {address} written to {cfg}")


@coord_app.command("register-node")
def register_node(
    public_key: Path = typer.Argument(..., help="The hospital's NAME.pub."),
    name: str = typer.Option(..., "--name", help="A name you will recognise in logs."),
    connection: str = typer.Option(DEFAULT_CONNECTION, "--connection"),
    flwr_home: Path = typer.Option(None, "--flwr-home", envvar="FLWR_HOME"),
    print_only: bool = typer.Option(False, "--print-only"),
) -> None:
    """Allow one hospital's key: only registered keys may join the federation."""
    from common.certs import public_key_fingerprint
    from common.errors import FedmergeError
    from common.flower_runtime import flower_env
    from server.deployment import register_argv

    argv = register_argv(public_key, connection, name)
    try:
        fp = public_key_fingerprint(public_key.read_bytes())
    except (ValueError, IndexError):
        raise FedmergeError(f"{public_key}: expected an OpenSSH public key line") from None
    typer.echo(f"key fingerprint {fp} (check it with the hospital before registering)")
    _echo_cmd(argv)
    if not print_only:
        _run_foreground(argv, flower_env(flwr_home))


@coord_app.command("submit")
def submit(
    recipe: Path = typer.Argument(..., help="The tuning recipe (YAML, TuningRecipe fields)."),
    out: Path = typer.Option(Path("runs/deploy"), "--out", help="Report directory."),
    sites: int = typer.Option(None, "--sites", help="Wait for this many hospitals."),
    connection: str = typer.Option(DEFAULT_CONNECTION, "--connection"),
    app_dir: Path = typer.Option(
        None, "--app-dir", help="The fedmerge source tree (default: this installation's)."
    ),
    stage_dir: Path = typer.Option(Path("runs/.staged-app"), "--stage-dir"),
    flwr_home: Path = typer.Option(None, "--flwr-home", envvar="FLWR_HOME"),
    print_only: bool = typer.Option(False, "--print-only"),
) -> None:
    """Validate RECIPE.yaml and submit a tuning run; the ServerApp writes --out/report.json."""
    from common.flower_runtime import flower_env
    from server.deployment import run_config_for, stage_app, submit_argv
    from server.recipe import load_recipe

    chosen = load_recipe(recipe).with_fingerprints()  # fails here if parents are missing
    run_config = run_config_for(chosen, out, sites)
    staged = stage_app(app_dir or None, stage_dir, run_config)
    typer.echo(f"parents: A {chosen.fingerprint_a[:16]}..., B {chosen.fingerprint_b[:16]}...")
    argv = submit_argv(staged, connection, run_config)
    _echo_cmd(argv)
    if not print_only:
        _run_foreground(argv, flower_env(flwr_home))
        typer.echo(f"submitted; the report will be written to {out.resolve()}/report.json")


def register(app: typer.Typer, certs: typer.Typer) -> None:
    certs.command("ca")(certs_ca)
    certs.command("server")(certs_server)
    app.add_typer(coord_app, name="coordinator")

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
DEFAULT_STATE = Path("superlink-state")


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
    state_dir: Path = typer.Option(
        DEFAULT_STATE, "--state-dir", help="PID file and superlink.log (rotated)."
    ),
    print_only: bool = typer.Option(False, "--print-only", help="Print, do not run."),
) -> None:
    """Start the SuperLink with TLS and node authentication, and record the CLI connection.
    SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop it with every process it started."""
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
        _supervise_superlink(argv, flower_env(home), host, port, state_dir)


def _supervise_superlink(argv: list[str], env: dict[str, str], host: str, port: int,
                         state_dir: Path) -> None:
    """Run the SuperLink until a stop signal or its exit; never leave a process behind."""
    import time

    from common.processes import proc_set, wait_for_port
    from common.service import PidFile, StopRequested, rotating_writer, stop_on_signals

    pid_file = PidFile(state_dir / "superlink.pid")
    pid_file.claim("a SuperLink", f"fedmerge coordinator stop-superlink --state-dir {state_dir}")
    log = rotating_writer(state_dir / "superlink.log", max_bytes=10_000_000, backups=5)

    def tee(line: str) -> None:
        log(line)
        typer.echo(line)

    try:
        with stop_on_signals(), proc_set() as procs:
            link = procs.start("superlink", argv, env=env, log_path=state_dir / "superlink.log",
                               on_line=tee)
            try:
                wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port,
                              timeout=120, proc=link)
            except (RuntimeError, TimeoutError):
                typer.secho(f"error: the SuperLink did not start listening on {host}:{port} "
                            f"(see {state_dir / 'superlink.log'})", err=True, fg="red")
                raise typer.Exit(1) from None
            typer.echo(f"running: SuperLink listening on {host}:{port}; stop with "
                       f"`fedmerge coordinator stop-superlink --state-dir {state_dir}`")
            while link.poll() is None:
                time.sleep(0.5)
            typer.secho(f"error: the SuperLink exited with code {link.poll()}", err=True)
            raise typer.Exit(1)
    except StopRequested as stop:
        typer.echo(f"stopped ({stop}): the SuperLink and every process it started are gone")
    finally:
        pid_file.release()


@coord_app.command("stop-superlink")
def stop_superlink(
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir", help="As given to start."),
) -> None:
    """Stop the SuperLink started with this --state-dir and wait until it is gone."""
    from common.service import stop_by_pid_file

    pid = stop_by_pid_file(state_dir / "superlink.pid", what="the SuperLink")
    typer.echo("no SuperLink was running from this state folder" if pid is None
               else f"stopped the SuperLink (pid {pid})")


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
    detach: bool = typer.Option(
        False, "--detach", help="Return once uploaded (print how to follow and stop the run)."
    ),
    print_only: bool = typer.Option(False, "--print-only"),
) -> None:
    """Validate RECIPE.yaml, submit a tuning run and wait for it, showing progress; the
    ServerApp writes --out/report.json for every run, failed ones included."""
    import time

    from common.flower_runtime import flower_env
    from server.deployment import run_config_for, stage_app, submit_argv
    from server.recipe import load_recipe
    from server.run_follow import how_to, upload, wait_for_report

    chosen = load_recipe(recipe).with_fingerprints()  # fails here if parents are missing
    run_config = run_config_for(chosen, out, sites)
    staged = stage_app(app_dir or None, stage_dir, run_config)
    typer.echo(f"parent A sha256 {chosen.fingerprint_a}")
    typer.echo(f"parent B sha256 {chosen.fingerprint_b}")
    argv = submit_argv(staged, connection, run_config)
    _echo_cmd(argv)
    if print_only:
        return
    env = flower_env(flwr_home)
    out = out.resolve()
    since = time.time()
    try:
        run_id = upload(argv, env)
    except KeyboardInterrupt:
        typer.echo("interrupted before the upload finished: no run was submitted "
                   f"(check with `flwr list {connection}`)")
        raise typer.Exit(130) from None
    typer.echo(f"submitted run {run_id}")
    for line in how_to(run_id, connection, out):
        typer.echo(line)
    if detach:
        return
    try:
        code = wait_for_report(run_id, connection, out, env, typer.echo, since=since)
    except KeyboardInterrupt:
        typer.echo(f"stopped waiting; run {run_id} continues on the SuperLink. Follow it with "
                   f"`flwr log {run_id} {connection}`, stop it with "
                   f"`flwr stop {run_id} {connection}`")
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer, certs: typer.Typer) -> None:
    certs.command("ca")(certs_ca)
    certs.command("server")(certs_server)
    app.add_typer(coord_app, name="coordinator")

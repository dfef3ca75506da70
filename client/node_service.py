"""`fedmerge node start|stop|status`: a hospital node as a service that runs for months.

Why: Flower's SuperNode says what went wrong only in its own log, in its own words ("[code:
2004] Failed to activate SuperNode.", "Connection attempt failed, retrying in 11.13
seconds", "SuperNode Runtime HTTP API failed to start."), and `kill` of the command that
started it left it running. Here the supervisor:

- refuses to start a second node from the same state folder (PID file) or on a runtime
  port already taken, naming the port;
- reads the SuperNode's output as it comes (`ConnectionWatch`), writes it rotated and
  without colour codes, and turns what it means into ONE plain line on the terminal and in
  `status.json`: connected (with the node id Flower logs once the SuperLink accepted the
  node), no SuperLink there yet (still retrying), key not registered (what the coordinator
  must run), certificate not trusted (which file), port in use;
- stops every process of the node on SIGTERM, SIGINT or SIGHUP (`common.service`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from client.node_file import NodeFile
from common.atomic_files import write_atomic
from common.errors import FedmergeError

PID_NAME = "node.pid"
STATUS_NAME = "status.json"
SITE_LOG = "site.log"
# Flower's reconnection back-off: exponential up to this many seconds between tries.
FLOWER_MAX_RETRY_S = 20

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("connected", re.compile(r"SuperNode ID: (\d+)")),
    ("retrying", re.compile(r"Connection attempt failed, retrying in ([\d.]+) seconds")),
    ("reconnected", re.compile(r"Connection successful after")),
    ("not-registered", re.compile(r"Failed to activate SuperNode|code: 2004")),
    ("ca-mismatch", re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL/TLS handshake error")),
    ("port-in-use", re.compile(r"[Aa]ddress already in use|Runtime HTTP API failed to start")),
]


def classify(line: str) -> tuple[str, str] | None:
    """What one line of the SuperNode's output means: (kind, captured value) or None."""
    for kind, pattern in _PATTERNS:
        m = pattern.search(line)
        if m:
            return kind, (m.group(1) if m.groups() else "")
    return None


class NodeStatus(BaseModel):
    """`status.json`: what the supervisor knows now (state is starting, connected,
    retrying, refused, failed or stopped)."""

    site: str
    superlink: str
    state: str
    node_id: int | None = None
    cause: str | None = None
    pid: int | None = None
    since: float
    updated: float


def port_in_use_message(port: int) -> str:
    return (
        f"127.0.0.1:{port} (connection.runtime_port) is already in use: another node or "
        "program listens there; give each node on this host its own runtime_port"
    )


def check_runtime_port(port: int) -> None:
    """Bind the runtime port as the SuperNode will (SO_REUSEADDR, like uvicorn) and let go."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise FedmergeError(port_in_use_message(port)) from None


class ConnectionWatch:
    """Follows the SuperNode's output; `status` is always the latest one-line truth."""

    def __init__(self, nf: NodeFile, site: str, status_path: Path,
                 on_change: Callable[[NodeStatus], None]) -> None:
        self.nf = nf
        self.status_path = status_path
        self.on_change = on_change
        now = time.time()
        self.status = NodeStatus(
            site=site, superlink=nf.connection.superlink, state="starting", pid=os.getpid(),
            since=now, updated=now,
        )
        self.ever_connected = False
        write_status(status_path, self.status)

    def message(self, kind: str, value: str) -> tuple[str, str]:
        """(state, plain line) for a classified line."""
        conn = self.nf.connection
        addr = conn.superlink
        if kind == "connected":
            return "connected", f"connected to {addr} as node {value}"
        if kind == "reconnected":
            return "connected", f"connected to {addr} again"
        if kind == "retrying":
            lead = (f"lost the SuperLink at {addr}" if self.ever_connected
                    else f"no SuperLink answering at {addr} yet")
            return "retrying", (
                f"{lead}; still retrying, every {FLOWER_MAX_RETRY_S} s at most (Flower's back-off)"
            )
        if kind == "not-registered":
            pub = conn.auth_private_key.with_suffix(".pub")
            return "refused", (
                f"the SuperLink at {addr} refused this node's key {conn.auth_private_key} "
                f"({key_fingerprint(conn.auth_private_key)}): it is not registered there; "
                f"the coordinator must run `fedmerge coordinator register-node {pub.name} "
                f"--name {self.status.site}` with the {pub.name} you sent"
            )
        if kind == "ca-mismatch":
            return "refused", (
                f"the SuperLink at {addr} presented a certificate that {conn.root_certificates}"
                " (connection.root_certificates) does not trust: get the coordinator's "
                "ca.pem, or check connection.superlink"
            )
        return "failed", port_in_use_message(conn.runtime_port)

    def feed(self, line: str) -> None:
        found = classify(line)
        if found is None:
            return
        kind, value = found
        state, text = self.message(kind, value)
        if kind == "connected":
            self.ever_connected = True
        node_id = int(value) if kind == "connected" else self.status.node_id
        if state == self.status.state and node_id == self.status.node_id and (
            state == "retrying" or text == self.status.cause
        ):
            return  # one line per change, not one per retry
        self.update(state=state, cause=text, node_id=node_id)

    def update(self, **fields) -> None:
        now = time.time()
        if fields.get("state") != self.status.state:
            fields["since"] = now
        self.status = self.status.model_copy(update={**fields, "updated": now})
        write_status(self.status_path, self.status)
        self.on_change(self.status)


def key_fingerprint(private_key: Path) -> str:
    try:
        from cryptography.hazmat.primitives import serialization

        from common.certs import public_key_fingerprint

        key = serialization.load_ssh_private_key(private_key.read_bytes(), None)
        return public_key_fingerprint(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ))
    except (OSError, ValueError, TypeError):
        return "fingerprint unreadable"


def write_status(path: Path, status: NodeStatus) -> None:
    write_atomic(path, status.model_dump_json(indent=2) + "\n")


def read_status(path: Path) -> NodeStatus | None:
    try:
        return NodeStatus.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_node(node_file: Path, echo: Callable[[str], None], *, print_only: bool = False) -> int:
    """Start the node's processes and supervise them until a stop signal (exit code)."""
    from client.node_config import NodeConfig
    from client.node_file import child_env, load_node_file, node_commands, node_config_values
    from common.flower_runtime import shell_line
    from common.service import PidFile

    nf = load_node_file(node_file)
    values = node_config_values(nf)
    site = NodeConfig.model_validate(nf.node).site or "site"
    commands = node_commands(nf.connection, values, nf.service)
    for _, argv in commands:
        echo(f"$ {shell_line(argv)}")
    if print_only:
        return 0
    state_dir = nf.service.dir
    pid_file = PidFile(state_dir / PID_NAME)
    running = pid_file.pid()
    try:
        check_runtime_port(nf.connection.runtime_port)
    except FedmergeError as exc:
        if running is None:
            raise
        raise FedmergeError(
            f"{exc}; a node already runs from {state_dir} (pid {running}): see "
            f"`fedmerge node status {node_file}`"
        ) from None
    pid_file.claim("a fedmerge node", f"fedmerge node stop {node_file}")
    try:
        return _supervise(nf, node_file, site, commands, child_env(nf.connection), echo)
    finally:
        pid_file.release()


def _supervise(nf: NodeFile, node_file: Path, site: str, commands, env: dict[str, str],
               echo: Callable[[str], None]) -> int:
    from common.processes import proc_set
    from common.service import StopRequested, rotating_writer, stop_on_signals

    state_dir = nf.service.dir
    printed: dict[str, str | None] = {"line": None}

    def on_change(status: NodeStatus) -> None:
        if status.state in ("stopped", "failed"):
            return  # said below, once
        line = (
            f"running: {status.cause}; logs in {state_dir}/; stop with "
            f"`fedmerge node stop {node_file}`"
            if status.state == "connected" else f"not connected: {status.cause}"
        )
        if line != printed["line"]:
            printed["line"] = line
            echo(line)

    watch = ConnectionWatch(nf, site, state_dir / STATUS_NAME, on_change)
    echo(f"starting node {site}; connecting to {nf.connection.superlink} ...")
    with stop_on_signals():
        try:
            with proc_set() as procs:
                started = []
                for name, argv in commands:
                    write = rotating_writer(state_dir / f"{name}.log",
                                            max_bytes=nf.service.max_bytes,
                                            backups=nf.service.log_backups)
                    sink = _tee(write, watch.feed) if name == "supernode" else write
                    started.append(procs.start(name, argv, env=env,
                                               log_path=state_dir / f"{name}.log", on_line=sink))
                while all(p.poll() is None for p in started):
                    time.sleep(0.5)
                dead = next(p for p in started if p.poll() is not None)
                time.sleep(0.5)  # its last lines are still being read
                why = watch.status.cause if watch.status.state in ("refused", "failed") else (
                    f"{dead.name} exited with code {dead.poll()} (see {dead.log_path})"
                )
                watch.update(state="failed", cause=why)
                echo(f"error: {why}")
                return 1
        except StopRequested as stop:
            watch.update(state="stopped", cause=f"stopped by {stop}")
            echo(f"stopped ({stop}): SuperNode and worker are gone")
            return 0
        finally:
            if watch.status.state not in ("stopped", "failed"):
                watch.update(state="stopped", cause="stopped")


def _tee(*sinks: Callable[[str], None]) -> Callable[[str], None]:
    def write(line: str) -> None:
        for sink in sinks:
            sink(line)

    return write


def stop_node(node_file: Path) -> int | None:
    """SIGTERM the node started from `node_file` and wait until it is gone; its pid, or
    None if none was running."""
    from client.node_file import load_node_file
    from common.service import stop_by_pid_file

    nf = load_node_file(node_file)
    return stop_by_pid_file(nf.service.dir / PID_NAME, what="the fedmerge node")


class NodeReport(BaseModel):
    """`fedmerge node status`: the supervisor's status, the site's last runs, the ledger."""

    site: str
    running: bool
    pid: int | None
    status: NodeStatus | None
    runs: list[dict]
    ledger: dict | None


def node_report(node_file: Path, runs: int = 5) -> NodeReport:
    from client.node_config import NodeConfig
    from client.node_file import load_node_file
    from client.site_log import last_runs
    from common.service import PidFile

    nf = load_node_file(node_file)
    cfg = NodeConfig.model_validate(nf.node)
    pid = PidFile(nf.service.dir / PID_NAME).pid()
    status = read_status(nf.service.dir / STATUS_NAME)
    if pid is None and status is not None and status.state not in ("stopped", "failed"):
        # The supervisor died without saying so (SIGKILL, power loss): it is not connected.
        status = status.model_copy(update={"state": "stopped", "cause": "not running"})
    ledger = None
    if cfg.ledger is not None:
        ledger = _ledger_summary(Path(node_file).resolve().parent / cfg.ledger,
                                 cfg.policy.max_releases_per_day, cfg.policy.privacy.max_delta)
    return NodeReport(
        site=cfg.site or "site", running=pid is not None, pid=pid, status=status,
        runs=[r.model_dump() for r in last_runs(nf.service.dir / SITE_LOG, runs)],
        ledger=ledger,
    )


def _ledger_summary(path: Path, per_day: int, delta: float) -> dict:
    from client.ledger import DAY_S, ReleaseLedger, epsilon_spent

    entries = ReleaseLedger(path).entries() if path.exists() else []
    now = time.time()
    return {
        "epsilon_spent": epsilon_spent(entries, delta),
        "delta": delta,
        "path": str(path),
        "releases": sum(1 for e in entries if e.kind == "release"),
        "sums": sum(1 for e in entries if e.kind == "sum"),  # sizes written at UNMASK
        "runs": len({e.run for e in entries}),
        "last_24h": sum(1 for e in entries if e.kind == "release" and now - e.time < DAY_S),
        "max_per_day": per_day,
        "last": max((e.time for e in entries), default=None),
    }


def report_lines(report: NodeReport) -> list[str]:
    """The human form of `node status`."""
    import datetime

    def when(t: float | None) -> str:
        if t is None:
            return "never"
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")

    st = report.status
    if st is None:
        lines = [f"node {report.site}: never started from this node file"]
    elif report.running and st.state == "connected":
        lines = [f"node {report.site}: {st.cause} (since {when(st.since)}, pid {report.pid})"]
    elif report.running:
        lines = [f"node {report.site}: running (pid {report.pid}) but not connected: {st.cause}"]
    else:
        lines = [f"node {report.site}: stopped ({st.cause}; last state {st.state} at "
                 f"{when(st.updated)})"]
    if report.runs:
        lines.append("last runs:")
        for r in report.runs:
            rule = f" ({r['rule']})" if r["rule"] else ""
            lines.append(f"  run {r['run']}: {r['outcome']}{rule}, {r['rounds']} round(s) "
                         f"released, {r['first']} .. {r['last']}")
    else:
        lines.append("last runs: none in the site log")
    if report.ledger is not None:
        led = report.ledger
        lines.append(
            f"ledger {led['path']}: {led['releases']} releases in {led['runs']} runs, "
            f"{led['last_24h']} of {led['max_per_day']} in the last 24 h, "
            f"last {when(led['last'])}, privacy spent ε {led['epsilon_spent']:.3g} "
            f"(δ {led['delta']:.0e})"
        )
    return lines


def dump(report: NodeReport) -> str:
    return json.dumps(report.model_dump(), indent=2)

"""From a hospital's node file to the exact Flower processes that serve it.

Why: `flower-supernode` takes a dozen flags whose mistakes only show at run time (a
`--node-config` string with a stray quote, a forgotten `--root-certificates`, two nodes on
one port). The hospital writes one YAML file instead, validated by pydantic, and
`fedmerge node start` prints and runs the two commands built here: the SuperNode in
`--isolation process` mode and the persistent ClientApp worker (`client.clientapp_worker`)
that keeps the parents and the tokenized cohort in memory across messages and rounds.

Node file layout::

    connection:                      # how this node reaches the coordinator
      superlink: link.example.org:9093
      root_certificates: certs/ca.pem
      auth_private_key: keys/hospital-a.key
      runtime_port: 9094             # local only; distinct per node on one host
      # active_poll_s: 0.25, active_window_s: 60, idle_poll_s: 3   (the SuperNode's poll)
    node: {...}                      # the NodeConfig fields (client/node_config.py)

Relative paths are resolved against the node file's directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.errors import FedmergeError, validation_error, validation_errors
from common.flower_runtime import check_host_port, flower_env, flower_exe, format_flower_config


class NodeConnection(BaseModel):
    """How a hospital's SuperNode reaches the coordinator, and which local port it uses."""

    model_config = ConfigDict(extra="forbid")

    superlink: str
    root_certificates: Path
    auth_private_key: Path
    runtime_port: int = Field(9094, ge=1024, le=65535)
    isolation: Literal["process", "subprocess"] = "process"
    app_source: Literal["installed", "fab"] = "installed"
    max_retries: int | None = Field(None, ge=0, le=1_000_000)
    max_wait_time: float | None = Field(None, gt=0, le=365 * 86_400)
    flwr_home: Path | None = None
    # The SuperNode's pull interval (client/supernode_poll.py): `active_poll_s` for
    # `active_window_s` seconds after the last message or reply, then growing to
    # `idle_poll_s` (Flower 1.41's own 3 s), which is also the most a run's first message
    # waits. `idle_poll_s: null` runs plain `flower-supernode` (always 3 s).
    active_poll_s: float = Field(0.25, gt=0, le=3)
    idle_poll_s: float | None = Field(3.0, gt=0, le=30)
    active_window_s: float = Field(60.0, ge=0, le=86_400)

    @field_validator("superlink")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_host_port(v, "superlink")

    @model_validator(mode="after")
    def _polls(self) -> NodeConnection:
        if self.idle_poll_s is not None and self.idle_poll_s < self.active_poll_s:
            raise ValueError(
                f"idle_poll_s {self.idle_poll_s} is below active_poll_s {self.active_poll_s}"
            )
        return self


class NodeService(BaseModel):
    """Where a node that runs for months keeps its state: the PID file (`node.pid`), its
    status (`status.json`) and its logs (`supernode.log`, `worker.log` and the site's own
    `site.log`), plain text, each rotated at `log_max_mb` with `log_backups` old files."""

    model_config = ConfigDict(extra="forbid")

    dir: Path = Path("node-state")  # relative to the node file's folder
    log_max_mb: float = Field(10.0, gt=0, le=10_000)
    log_backups: int = Field(5, ge=0, le=1000)

    @property
    def max_bytes(self) -> int:
        return int(self.log_max_mb * 1_000_000)


class NodeFile(BaseModel):
    """The whole node file: the connection plus the node's NodeConfig fields (raw here)."""

    model_config = ConfigDict(extra="forbid")

    connection: NodeConnection
    node: dict[str, Any]
    service: NodeService = NodeService()
    path: Path | None = None


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def load_node_file(path: str | Path) -> NodeFile:
    """Parse and validate the node file; one error naming the file and field if it is bad."""
    from client.node_config import NodeConfig
    from common.config_io import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, "node file")
    failures: list[tuple[ValidationError, str]] = []
    nf = None
    try:
        nf = NodeFile.model_validate({**raw, "path": path})
    except ValidationError as exc:
        failures.append((exc, ""))
    if isinstance(raw.get("node"), dict):  # every error of both sections at once
        try:
            NodeConfig.model_validate(raw["node"])
        except ValidationError as exc:
            failures.append((exc, "node."))
    if failures or nf is None:
        raise validation_errors(str(path), failures) from None
    base = path.resolve().parent
    conn = nf.connection.model_copy(
        update={
            "root_certificates": _resolve(base, nf.connection.root_certificates),
            "auth_private_key": _resolve(base, nf.connection.auth_private_key),
            "flwr_home": _resolve(base, nf.connection.flwr_home),
        }
    )
    service = nf.service.model_copy(update={"dir": _resolve(base, nf.service.dir)})
    return nf.model_copy(update={"connection": conn, "service": service})


def node_config_values(nf: NodeFile) -> dict[str, Any]:
    """The node section validated by NodeConfig, as the flat dict Flower hands the app.

    Relative paths (parents, the data spec's path) are resolved against the node file's
    directory, because the ClientApp runs with another working directory. The result is
    parsed back with the app's own `parse_node_config` and must give the same NodeConfig,
    so what the dry run checked is exactly what the running node uses.
    """
    from client.node_config import NodeConfig, parse_node_config

    assert nf.path is not None
    base = nf.path.resolve().parent
    try:
        cfg = NodeConfig.model_validate(nf.node)
    except ValidationError as exc:
        raise validation_error(str(nf.path), exc, prefix="node.") from None
    if cfg.simulated is not None:
        raise FedmergeError(f"{nf.path}: field node.simulated: only for simulation, not a node")
    cfg = cfg.model_copy(
        update={
            "parent_a": _resolve(base, Path(cfg.parent_a)),
            "parent_b": _resolve(base, Path(cfg.parent_b)),
            "data": resolve_data_spec(cfg.data, base),
            "ledger": _resolve(base, cfg.ledger),
        }
    )
    values = to_flower_node_config(cfg)
    if parse_node_config(values, source=str(nf.path)) != cfg:  # pragma: no cover - a bug guard
        raise FedmergeError(f"{nf.path}: node section does not round-trip through node config")
    return values


def resolve_data_spec(spec: str, base: Path) -> str:
    """`jsonl:rel/path` -> `jsonl:/abs/path` (keeping any `?query`); `synthetic:` unchanged."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind == "synthetic":
        return spec
    path, q, query = rest.partition("?")
    return f"{kind}:{_resolve(base, Path(path))}{q}{query}"


def to_flower_node_config(cfg) -> dict[str, Any]:
    """NodeConfig to the `--node-config` keys `client.node_config.parse_node_config` reads."""
    from client.node_config import NODE_KEYS, NodeConfig, policy_to_flat

    defaults = NodeConfig.model_fields
    out: dict[str, Any] = {}
    for key, field in NODE_KEYS.items():
        value = getattr(cfg, field)
        if value is None or (value == defaults[field].default and field != "device"):
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    out.update(policy_to_flat(cfg.policy))
    return out


def child_env(conn: NodeConnection) -> dict[str, str]:
    """The environment of the node's processes: offline, with the node's own FLWR_HOME."""
    return flower_env(conn.flwr_home)


def supernode_argv(conn: NodeConnection, node_config: dict[str, Any]) -> list[str]:
    """The `flower-supernode` command for this node (TLS + node authentication always on)."""
    if conn.idle_poll_s is None:
        head = [flower_exe("flower-supernode")]
    else:
        head = [
            sys.executable, "-m", "client.supernode_poll",
            "--active-poll", str(conn.active_poll_s),
            "--idle-poll", str(conn.idle_poll_s),
            "--active-window", str(conn.active_window_s),
        ]
    argv = [
        *head,
        "--superlink", conn.superlink,
        "--root-certificates", str(conn.root_certificates),
        "--auth-supernode-private-key", str(conn.auth_private_key),
        "--isolation", conn.isolation,
        "--host", "127.0.0.1",
        "--port", str(conn.runtime_port),
    ]
    if conn.max_retries is not None:
        argv += ["--max-retries", str(conn.max_retries)]
    if conn.max_wait_time is not None:
        argv += ["--max-wait-time", str(conn.max_wait_time)]
    if node_config:
        argv += ["--node-config", format_flower_config(node_config, what="node config")]
    return argv


def worker_argv(conn: NodeConnection, service: NodeService | None = None) -> list[str] | None:
    """The persistent ClientApp worker, needed only with `--isolation process`; with
    `service`, it writes the site's structured log there (`site.log`, rotated)."""
    if conn.isolation != "process":
        return None
    argv = [
        sys.executable, "-m", "client.clientapp_worker",
        "--runtime-api-address", f"127.0.0.1:{conn.runtime_port}",
        "--app-source", conn.app_source,
    ]
    if service is not None:
        argv += [
            "--site-log", str(service.dir / "site.log"),
            "--log-max-bytes", str(service.max_bytes),
            "--log-backups", str(service.log_backups),
        ]
    return argv


def node_commands(
    conn: NodeConnection, node_config: dict[str, Any], service: NodeService | None = None
) -> list[tuple[str, list[str]]]:
    """What `fedmerge node start` runs, in order; the dry run prints the same list."""
    commands = [("supernode", supernode_argv(conn, node_config))]
    worker = worker_argv(conn, service)
    if worker:
        commands.append(("worker", worker))
    return commands

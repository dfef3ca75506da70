"""A rehearsal of a whole deployment on one machine: SuperLink, SuperNodes, workers, 127.0.0.1.

Why: the end-to-end tests and `bench/deploy_round.py` must run the real Flower processes
with TLS and node authentication exactly as operators do (the same command builders as the
`fedmerge coordinator` and `fedmerge node` commands), and must never leave one behind. Every
process is started in its own process group through `common.processes` and `close()` stops
them all.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.node_file import NodeConnection, supernode_argv, worker_argv
from common.errors import FedmergeError
from common.flower_runtime import flower_env, flower_exe
from common.processes import Proc, ProcSet, free_port, wait_for_port
from server.deployment import register_argv, submit_argv, superlink_argv, write_connection

CONNECTION = "fedmerge-local"


@dataclass
class LocalNode:
    name: str
    supernode: Proc
    worker: Proc | None
    runtime_port: int


@dataclass
class LocalDeployment:
    """Key material under `root`, processes in `procs`; use as a context manager."""

    root: Path
    app_dir: Path
    isolation: str = "process"
    procs: ProcSet = field(default_factory=ProcSet)
    superlink: Proc | None = None
    port: int = 0
    nodes: dict[str, LocalNode] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"
        self.logs = self.root / "logs"
        self.home = self.root / "flwr-home"

    # -- key material ---------------------------------------------------------------------
    def make_certs(self, node_names: list[str]) -> None:
        from common.certs import create_ca, create_node_keys, create_server_cert

        create_ca(self.certs)
        create_server_cert(self.certs, self.certs, sans=["IP:127.0.0.1", "DNS:localhost"])
        for name in node_names:
            create_node_keys(self.keys, name)

    # -- coordinator ----------------------------------------------------------------------
    def start_superlink(self, timeout: float = 60.0) -> None:
        self.port = free_port()
        argv = superlink_argv(
            ca=self.certs / "ca.pem", cert=self.certs / "superlink.pem",
            key=self.certs / "superlink.key", host="127.0.0.1", port=self.port,
        )
        write_connection(
            self.home, CONNECTION, address=f"127.0.0.1:{self.port}",
            root_certificates=self.certs / "ca.pem",
        )
        self.superlink = self.procs.start(
            "superlink", argv, env=flower_env(self.home), log_path=self.logs / "superlink.log",
            cwd=self.root,
        )
        wait_for_port("127.0.0.1", self.port, timeout=timeout, proc=self.superlink)

    def flwr(self, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            argv, env=flower_env(self.home), capture_output=True, text=True, timeout=timeout,
            cwd=self.root,
        )

    def register(self, *names: str) -> None:
        """Register node keys; the `flwr` CLI calls run concurrently (each ~1 s of start-up)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(name: str) -> None:
            res = self.flwr(register_argv(self.keys / f"{name}.pub", CONNECTION, name))
            if res.returncode != 0:
                raise FedmergeError(f"registering {name} failed: {res.stdout}{res.stderr}")

        with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
            list(pool.map(one, names))

    def submit(self, run_config: dict[str, Any], app_dir: Path | None = None) -> int:
        argv = submit_argv(app_dir or self.app_dir, CONNECTION, run_config)
        res = self.flwr(argv, timeout=120)
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            return int(payload["run-id"])
        except (ValueError, KeyError):
            raise FedmergeError(f"flwr run failed: {res.stdout}{res.stderr}") from None

    def run_status(self, run_id: int) -> str:
        res = self.flwr(
            [flower_exe("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"]
        )
        try:
            payload = json.loads(res.stdout[res.stdout.index("{"):])
            return str(payload["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return "unknown"

    def wait_for_file(self, path: Path, run_id: int, timeout: float) -> None:
        """Until the ServerApp writes `path`; fail fast if the run finished without it."""
        deadline = time.monotonic() + timeout
        next_status = time.monotonic() + 10
        while time.monotonic() < deadline:
            if path.exists():
                return
            if time.monotonic() > next_status:
                status = self.run_status(run_id)
                if status.startswith("finished") and not path.exists():
                    time.sleep(1.0)
                    if not path.exists():
                        raise FedmergeError(f"run {run_id} {status} without {path}\n{self.tails()}")
                next_status = time.monotonic() + 10
            time.sleep(0.25)
        raise TimeoutError(f"run {run_id}: no {path} after {timeout:.0f}s\n{self.tails()}")

    # -- hospitals ------------------------------------------------------------------------
    def connection(self, name: str, *, with_ca: bool = True, **kw) -> NodeConnection:
        return NodeConnection(
            superlink=f"127.0.0.1:{self.port}",
            root_certificates=self.certs / "ca.pem" if with_ca else Path("/nonexistent"),
            auth_private_key=self.keys / f"{name}.key",
            runtime_port=free_port(),
            isolation=self.isolation,
            flwr_home=self.root / f"home-{name}",
            **kw,
        )

    def start_node(
        self, name: str, node_config: dict[str, Any], *, with_ca: bool = True, **kw
    ) -> LocalNode:
        conn = self.connection(name, with_ca=with_ca, **kw)
        argv = supernode_argv(conn, node_config)
        if not with_ca:  # as a careless operator would: no pinned CA, system store only
            i = argv.index("--root-certificates")
            del argv[i : i + 2]
        env = flower_env(conn.flwr_home)
        sn = self.procs.start(
            f"supernode-{name}", argv, env=env, log_path=self.logs / f"supernode-{name}.log",
            cwd=self.root,
        )
        worker = None
        wargv = worker_argv(conn)
        if wargv is not None:
            worker = self.procs.start(
                f"worker-{name}", wargv, env=env, log_path=self.logs / f"worker-{name}.log",
                cwd=self.root,
            )
        node = LocalNode(name, sn, worker, conn.runtime_port)
        self.nodes[name] = node
        return node

    def tails(self, lines: int = 25) -> str:
        out = []
        for p in sorted(self.logs.glob("*.log")):
            text = p.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)

    def close(self) -> None:
        self.procs.stop_all()

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

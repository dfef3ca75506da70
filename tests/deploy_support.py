"""Shared pieces of the real-deployment tests: per-site data, node files, process checks."""

from __future__ import annotations

from pathlib import Path


def write_cohort(root: Path, cohort: str):
    """One JSONL per hospital plus their union: (union, files, site names, site records)."""
    from common.data import load_records
    from common.data.splits import split_records, write_site_files

    names, parts = split_records(load_records(cohort), "region", None, 0)
    union, files = write_site_files(root, names, parts)
    return union, files, names, parts


def node_file(path: Path, site: str, data: Path, parents, conn, policy: dict,
              fault: str = "", **connection) -> Path:
    """A hospital's node file as an operator writes it (one scoring thread: nodes share the
    machine's two cores, as the simulated nodes do); its state folder is `NAME-state/`
    next to it. `connection` adds or replaces connection fields."""
    import yaml

    node = {
        "site": site, "data": f"jsonl:{data.name}", "parent_a": str(parents[0]),
        "parent_b": str(parents[1]), "policy": policy, "threads": 1,
    }
    if fault:
        node["test_fault"] = fault
    path.write_text(yaml.safe_dump({
        "connection": {
            "superlink": conn.superlink,
            "root_certificates": str(conn.root_certificates),
            "auth_private_key": str(conn.auth_private_key),
            "runtime_port": conn.runtime_port,
            **connection,
        },
        "node": node,
        "service": {"dir": f"{path.stem}-state"},
    }))
    return path


class NodeService:
    """`fedmerge node start NODE_FILE` as an operator (or systemd) runs it: its own process,
    its terminal output in a file."""

    def __init__(self, path: Path) -> None:
        import subprocess
        import sys

        self.path = path
        self.out = path.with_suffix(".out")
        self.state = path.parent / f"{path.stem}-state"
        with open(self.out, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "common.cli", "node", "start", str(path)],
                stdout=fh, stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> str:
        """Until the terminal output holds `text` (TimeoutError naming it otherwise)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise TimeoutError(f"{self.path.name}: no {text!r} in its output:\n{self.output()}")

    def status(self) -> dict:
        """`fedmerge node status --json` as a dict."""
        import json
        import subprocess
        import sys

        res = subprocess.run(
            [sys.executable, "-m", "common.cli", "node", "status", str(self.path), "--json"],
            capture_output=True, text=True, timeout=60,
        )
        return {"exit": res.returncode, **json.loads(res.stdout)}

    def kill(self) -> None:
        """A test's cleanup (the test itself stops it with a signal): SIGTERM, then SIGKILL
        for it and everything under it."""
        import contextlib
        import subprocess

        import psutil

        if self.proc.poll() is not None:
            return
        tree = [psutil.Process(p) for p in descendants([self.proc.pid])]
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(20)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.wait(10)


def descendants(pids: list[int]) -> dict[int, str]:
    """pid -> name of the started processes and everything under them, whatever their group
    (flower-superlink starts flower-superexec in a session of its own)."""
    import psutil

    found = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in (proc, *proc.children(recursive=True)):
                found[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return found


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

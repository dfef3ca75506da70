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
              fault: str = "") -> Path:
    """A hospital's node file as an operator writes it (one scoring thread: nodes share the
    machine's two cores, as the simulated nodes do)."""
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
        },
        "node": node,
    }))
    return path


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

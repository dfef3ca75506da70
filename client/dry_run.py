"""A hospital's check of its own node before it joins: everything local, nothing on the wire.

Why: a mistake found during a federated round costs every site a round (and shows up on
the coordinator's screen); found here it costs one command. The dry run goes through the
same code the running ClientApp uses (`client.node_cache`) to load the cohort, fingerprint and
load the parents, and reads the TLS CA and the node key the SuperNode will use, so a green
dry run means the node will start with these files. It opens no socket.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pydantic import BaseModel

from common.errors import FedmergeError


class FoldCount(BaseModel):
    fold: int
    records: int
    positives: int


class DryRunReport(BaseModel):
    node_file: Path
    site: str
    data: str
    records: int
    positives: int
    folds: list[FoldCount]
    parent_a: Path
    parent_b: Path
    parent_a_sha256: str
    parent_b_sha256: str
    parameters: int
    memory: str  # where the live model and the parents sit, and why
    superlink: str
    ca_subject: str
    ca_not_after: str
    node_key_fingerprint: str
    node_config: dict[str, object]
    commands: list[str]
    warnings: list[str]


def _check_ca(path: Path) -> tuple[str, str]:
    from cryptography import x509

    if not path.is_file():
        raise FedmergeError(f"connection.root_certificates {path}: file not found")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise FedmergeError(
            f"connection.root_certificates {path}: expected the coordinator's PEM CA certificate"
        ) from None
    return cert.subject.rfc4514_string(), cert.not_valid_after_utc.isoformat()


def _check_node_key(path: Path, warnings: list[str]) -> str:
    """The key as `flower-supernode --auth-supernode-private-key` loads it (EC, OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.certs import public_key_fingerprint

    if not path.is_file():
        raise FedmergeError(f"connection.auth_private_key {path}: file not found")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedmergeError(
            f"connection.auth_private_key {path}: expected an unencrypted EC key in OpenSSH "
            "format (make one with `fedmerge certs node NAME`)"
        )
    if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        warnings.append(f"{path} is readable by other users; chmod 600 it")
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public_key_fingerprint(public)


def dry_run(node_file: str | Path, *, folds: int = 2, fold_seed: int = 0) -> DryRunReport:
    """Validate the node file, load data and parents, and describe what `start` would run."""
    from client import node_cache
    from client.node_config import parse_node_config
    from client.node_file import load_node_file, node_commands, node_config_values
    from common.data.folds import select_fold
    from common.flower_runtime import shell_line

    nf = load_node_file(node_file)
    values = node_config_values(nf)
    cfg = parse_node_config(values, source=str(node_file))
    warnings: list[str] = []
    conn = nf.connection
    if conn.app_source == "fab":
        warnings.append(
            "connection.app_source: fab runs the app the coordinator ships through the "
            "SuperLink, not the fedmerge installed and reviewed here (use 'installed')"
        )
    if conn.isolation == "subprocess":
        warnings.append(
            "connection.isolation: subprocess starts Flower's own executor, which runs the "
            "coordinator-shipped app in a new process per message (use 'process')"
        )
    ca_subject, ca_not_after = _check_ca(conn.root_certificates)
    key_fp = _check_node_key(conn.auth_private_key, warnings)

    site, records = node_cache.site_records(cfg, hard=False)
    if not records:
        raise FedmergeError(f"{node_file}: field node.data: {cfg.data} has no records")
    per_fold = []
    for f in range(folds):
        chosen = select_fold(records, f, folds, fold_seed)
        per_fold.append(
            FoldCount(fold=f, records=len(chosen), positives=sum(r.label for r in chosen))
        )
        if len(chosen) < cfg.policy.min_cohort:
            warnings.append(
                f"fold {f} has {len(chosen)} records, below this node's min_cohort "
                f"{cfg.policy.min_cohort}: the node will refuse to score it"
            )
        elif sum(r.label for r in chosen) < cfg.policy.min_positives:
            warnings.append(
                f"fold {f} has {sum(r.label for r in chosen)} positives, below min_positives "
                f"{cfg.policy.min_positives}: the node will refuse to score it"
            )
    fp_a = node_cache.parent_fingerprint(cfg.parent_a)
    fp_b = node_cache.parent_fingerprint(cfg.parent_b)
    live = node_cache.merger(cfg, "linear")  # loads both parents and checks they are mergeable
    parameters = sum(p.numel() for p in live.model.parameters())
    mem = live.memory
    dtype = str(live.dtype).removeprefix("torch.")
    memory = (f"live model {mem['live_bytes'] / 1e9:.2f} GB {dtype} on {live.device}; "
              f"parents {mem['parent_bytes'] / 1e9:.2f} GB "
              f"{live.placement} ({live.placement_reason})")

    commands = [shell_line(argv) for _, argv in node_commands(conn, values, nf.service)]
    return DryRunReport(
        node_file=Path(node_file), site=site, data=cfg.data, records=len(records),
        positives=sum(r.label for r in records), folds=per_fold,
        parent_a=cfg.parent_a, parent_b=cfg.parent_b,
        parent_a_sha256=fp_a, parent_b_sha256=fp_b, parameters=parameters, memory=memory,
        superlink=conn.superlink, ca_subject=ca_subject, ca_not_after=ca_not_after,
        node_key_fingerprint=key_fp, node_config=values, commands=commands, warnings=warnings,
    )

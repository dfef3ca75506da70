"""`fedmerge node start|stop|status` as a service: plain lines for what Flower's log says,
a PID file, and a stop signal that takes the whole node down.

The real-process test starts `fedmerge node start` against a port where no SuperLink
listens (what can be produced on 127.0.0.1 without one); the connected / not registered /
untrusted certificate lines are produced by real Flower in tests/test_deploy.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from deploy_support import alive, descendants
from typer.testing import CliRunner

from common.cli import app
from common.errors import FedmergeError

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from common.certs import create_ca, create_node_keys

    d = tmp_path_factory.mktemp("svc-keys")
    create_ca(d / "certs")
    create_node_keys(d / "keys", "hospital-a")
    return d


def _node_file(folder: Path, keys: Path, tiny_parents, port: int, superlink: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump({
        "connection": {"superlink": superlink, "root_certificates": str(keys / "certs/ca.pem"),
                       "auth_private_key": str(keys / "keys/hospital-a.key"),
                       "runtime_port": port},
        "node": {"site": "hospital-a", "data": "synthetic:sites=3,stays=20,site=1",
                 "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1])},
    }))
    return path


# Lines as flwr 1.41 writes them (colour codes included), and what each must become.
FLOWER_LINES = {
    "\x1b[92mINFO \x1b[0m:      SuperNode ID: 4242": ("connected", "4242"),
    "\x1b[93mWARNING \x1b[0m:   Connection attempt failed, retrying in 11.13 seconds":
        ("retrying", "11.13"),
    "\x1b[91mERROR \x1b[0m:     [code: 2004] Failed to activate SuperNode.":
        ("not-registered", ""),
    "httpx.ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed":
        ("ca-mismatch", ""),
    "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 9094): "
    "address already in use": ("port-in-use", ""),
    "RuntimeError: SuperNode Runtime HTTP API failed to start.": ("port-in-use", ""),
    "INFO :      Connection successful after 3.20 seconds and 2 tries.": ("reconnected", ""),
    "INFO :      [RUN 77, ROUND 1]": None,
}


@pytest.mark.parametrize(("line", "expected"), list(FLOWER_LINES.items()))
def test_flower_lines_are_classified(line, expected):
    from client.node_service import classify

    assert classify(line) == expected


def test_each_cause_is_one_plain_line_naming_what_to_do(keys, tiny_parents, tmp_path):
    from client.node_file import load_node_file
    from client.node_service import ConnectionWatch, read_status

    nf = load_node_file(_node_file(tmp_path, keys, tiny_parents, 9094, "127.0.0.1:9093"))
    seen = []
    watch = ConnectionWatch(nf, "hospital-a", tmp_path / "status.json", seen.append)

    def said(line: str) -> str:
        watch.feed(line)
        return seen[-1].cause

    retry = said("Connection attempt failed, retrying in 1.50 seconds")
    assert retry == ("no SuperLink answering at 127.0.0.1:9093 yet; still retrying, every 20 s "
                     "at most (Flower's back-off)")
    n = len(seen)
    watch.feed("Connection attempt failed, retrying in 3.10 seconds")
    assert len(seen) == n  # one line per change, not per retry
    assert said("SuperNode ID: 4242") == "connected to 127.0.0.1:9093 as node 4242"
    assert read_status(tmp_path / "status.json").node_id == 4242
    assert said("Connection attempt failed, retrying in 1.00 seconds").startswith(
        "lost the SuperLink at 127.0.0.1:9093; still retrying")
    refused = said("[code: 2004] Failed to activate SuperNode.")
    assert "refused this node's key" in refused and "not registered" in refused
    assert "`fedmerge coordinator register-node hospital-a.pub --name hospital-a`" in refused
    assert "SHA256:" in refused or "sha256" in refused.lower()
    ca = said("ssl.SSLCertVerificationError: CERTIFICATE_VERIFY_FAILED")
    assert f"{keys / 'certs/ca.pem'} (connection.root_certificates) does not trust" in ca
    assert said("address already in use") == (
        "127.0.0.1:9094 (connection.runtime_port) is already in use: another node or program "
        "listens there; give each node on this host its own runtime_port")
    assert all("\n" not in s.cause for s in seen)


def test_second_node_on_a_taken_port_names_the_port(keys, tiny_parents, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _node_file(tmp_path / "second", keys, tiny_parents, port, "127.0.0.1:9093")
        res = runner.invoke(app, ["node", "start", str(path)])
    assert isinstance(res.exception, FedmergeError), res.output
    assert str(res.exception) == (
        f"127.0.0.1:{port} (connection.runtime_port) is already in use: another node or "
        "program listens there; give each node on this host its own runtime_port")
    assert not (tmp_path / "second/node-state/node.pid").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_every_stop_signal_becomes_one_stop_request(signum):
    from common.service import StopRequested, stop_on_signals

    before = signal.getsignal(signum)
    with pytest.raises(StopRequested) as stop, stop_on_signals():
        os.kill(os.getpid(), signum)
        time.sleep(1.0)
    assert stop.value.signum == signum
    assert signal.getsignal(signum) == before


def _wait_for(what: str, cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def test_node_start_without_superlink_then_sighup_stops_everything(keys, tiny_parents,
                                                                   tmp_path):
    """Real processes: `node start` says it is retrying (not "running"), refuses a second
    start from its folder, and SIGHUP takes down the wrapper, the SuperNode and the worker."""
    from common.processes import free_port

    path = _node_file(tmp_path, keys, tiny_parents, free_port(), f"127.0.0.1:{free_port()}")
    out = tmp_path / "start.out"
    with open(out, "wb") as fh:
        wrapper = subprocess.Popen([sys.executable, "-m", "common.cli", "node", "start",
                                    str(path)], stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        _wait_for("retry line", lambda: "not connected: no SuperLink answering" in
                  out.read_text(), 60)
        status = runner.invoke(app, ["node", "status", str(path), "--json"])
        report = json.loads(status.output)
        assert status.exit_code == 3 and report["running"] and report["pid"] == wrapper.pid
        assert report["status"]["state"] == "retrying"
        second = runner.invoke(app, ["node", "start", str(path)])
        # Its runtime port is taken by the first, and the first is named (PID file).
        refused = str(second.exception)
        assert "already runs from" in refused and f"(pid {wrapper.pid})" in refused, refused
        tree = descendants([wrapper.pid])
        assert len(tree) >= 3, tree  # wrapper, SuperNode, worker
        os.kill(wrapper.pid, signal.SIGHUP)
        assert wrapper.wait(30) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert [p for p in tree if alive(p)] == []
    text = out.read_text()
    assert "running:" not in text
    assert "stopped (SIGHUP): SuperNode and worker are gone" in text
    assert not (tmp_path / "node-state/node.pid").exists()
    status = runner.invoke(app, ["node", "status", str(path)])
    assert status.exit_code == 3
    assert status.output.startswith("node hospital-a: stopped (stopped by SIGHUP;")
    assert "\x1b[" not in (tmp_path / "node-state/supernode.log").read_text()


def test_superlink_wrapper_stops_flower_superlink_and_superexec(tmp_path):
    """`coordinator start-superlink` under `coordinator stop-superlink`: flower-superlink
    and the flower-superexec it starts in a session of its own are both gone."""
    from common.certs import create_ca, create_server_cert
    from common.processes import free_port

    create_ca(tmp_path / "certs")
    create_server_cert(tmp_path / "certs", tmp_path / "certs", sans=["IP:127.0.0.1"])
    out = tmp_path / "superlink.out"
    state = tmp_path / "state"
    cli = [sys.executable, "-m", "common.cli", "coordinator"]
    with open(out, "wb") as fh:
        wrapper = subprocess.Popen(
            [*cli, "start-superlink", "--certs", str(tmp_path / "certs"), "--port",
             str(free_port()), "--flwr-home", str(tmp_path / "home"), "--state-dir", str(state)],
            stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for("running line", lambda: "running: SuperLink listening" in out.read_text(), 60)
        _wait_for("superexec", lambda: len(descendants([wrapper.pid])) >= 3, 30)
        tree = descendants([wrapper.pid])
        stop = subprocess.run([*cli, "stop-superlink", "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and f"stopped the SuperLink (pid {wrapper.pid})" in \
            stop.stdout, stop.stdout + stop.stderr
        assert wrapper.wait(10) == 0
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert any("superexe" in name for name in tree.values()), tree  # 15-char names
    assert [p for p in tree if alive(p)] == []
    assert not (state / "superlink.pid").exists()
    assert "stopped (SIGTERM): the SuperLink and every process it started are gone" in \
        out.read_text()


@pytest.mark.adversarial
def test_the_site_log_keeps_coordinator_text_out(tmp_path):
    """Values the coordinator chooses (a stage, a method) reach the site's log only when they
    are plain codes: a forged value with a newline cannot add a line or fake an event."""
    from client import site_log

    path = tmp_path / "site.log"
    saved = (list(site_log.log.handlers), site_log.log.propagate)
    try:
        site_log.configure(path, max_bytes=1 << 20, backups=1)
        site_log.site_event("round", run=7, stage="tune\nevent=finished run=9", method="a b",
                            fold=0)
    finally:
        for h in site_log.log.handlers:
            h.close()
        site_log.log.handlers[:], site_log.log.propagate = saved
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("event=round run=7 stage=? method=? fold=0")

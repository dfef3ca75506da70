"""Fast checks of what the deployment commands build, parsed back with Flower's own parsers."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from common.cli import app
from common.errors import FedmergeError

runner = CliRunner()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from common.certs import create_ca, create_node_keys, create_server_cert

    d = tmp_path_factory.mktemp("keyed")
    create_ca(d / "certs")
    create_server_cert(d / "certs", d / "certs", sans=["IP:127.0.0.1"])
    create_node_keys(d / "keys", "hospital-a")
    return d


@pytest.fixture(scope="module")
def node_file(keyed, tiny_parents):
    from common.data import load_records

    records = load_records("synthetic:sites=1,stays=40,seed=3")
    with open(keyed / "site.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps({"id": r.stay_id, "label": r.label, "text": r.text}) + "\n")
    path = keyed / "node.yaml"
    path.write_text(yaml.safe_dump({
        "connection": {"superlink": "127.0.0.1:9093", "root_certificates": "certs/ca.pem",
                       "auth_private_key": "keys/hospital-a.key", "runtime_port": 9199},
        "node": {"site": "hospital-a", "data": "jsonl:site.jsonl",
                 "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1]),
                 "policy": {"min_cohort": 5, "min_positives": 1}},
    }))
    return path


def test_flower_config_string_round_trips_through_flowers_parser():
    from flwr.common.config import parse_config_args

    from client.node_file import format_flower_config

    values = {"data": "jsonl:/a b/c\\d.jsonl", "min-sites": 3, "lo": -16.0, "hard": False}
    assert parse_config_args([format_flower_config(values, what="x")]) == values
    with pytest.raises(FedmergeError, match="single quote"):
        format_flower_config({"data": "it's"}, what="node config")


def test_node_file_resolves_paths_and_round_trips(node_file, keyed):
    from client.node_config import parse_node_config
    from client.node_file import load_node_file, node_config_values

    nf = load_node_file(node_file)
    assert nf.connection.root_certificates == (keyed / "certs/ca.pem").resolve()
    values = node_config_values(nf)
    assert values["data"] == f"jsonl:{(keyed / 'site.jsonl').resolve()}"
    cfg = parse_node_config(values)
    assert (cfg.policy.min_cohort, cfg.policy.min_positives, cfg.site) == (5, 1, "hospital-a")
    assert (cfg.dtype, cfg.parent_placement) == ("auto", "auto")
    raw = yaml.safe_load(node_file.read_text())
    raw["node"].update(device="cuda:1", dtype="bfloat16", parent_placement="host")
    edited = keyed / "node-gpu.yaml"
    edited.write_text(yaml.safe_dump(raw))
    values = node_config_values(load_node_file(edited))
    assert (values["device"], values["dtype"], values["parent-placement"]) == (
        "cuda:1", "bfloat16", "host")
    cfg = parse_node_config(values)
    assert (cfg.device, cfg.dtype, cfg.parent_placement) == ("cuda:1", "bfloat16", "host")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["connection"].pop("auth_private_key"), "field 'connection.auth_private_key'"),
        (lambda d: d["connection"].update(superlink="nohost"), "field 'connection.superlink'"),
        (lambda d: d["node"].pop("parent_a"), "field 'node.parent_a'"),
        (lambda d: d["node"].update(simulated={"sites": 3, "index": 0}), "node.simulated"),
        (lambda d: d["connection"].update(idle_poll_s=0.1), "below active_poll_s"),
        (lambda d: d["node"].update(dtype="fp8"), "field 'node.dtype'"),
        (lambda d: d["node"].update(parent_placement="gpu"), "field 'node.parent_placement'"),
    ],
)
def test_bad_node_file_is_one_error_naming_file_and_field(node_file, tmp_path, edit, message):
    from client.node_file import load_node_file, node_config_values

    raw = yaml.safe_load(node_file.read_text())
    edit(raw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(FedmergeError) as err:
        node_config_values(load_node_file(bad))
    assert str(bad) in str(err.value) and message in str(err.value)


def test_node_start_print_only_shows_tls_auth_and_worker(node_file):
    from flwr.common.config import parse_config_args

    res = runner.invoke(app, ["node", "start", str(node_file), "--print-only"])
    assert res.exit_code == 0, res.output
    lines = [shlex.split(x[2:]) for x in res.output.splitlines() if x.startswith("$ ")]
    supernode, worker = lines
    # Flower's own SuperNode CLI with an adaptive poll (client.supernode_poll): 0.25 s for
    # 60 s after a message, then backing off to Flower's own 3 s.
    assert supernode[1:9] == ["-m", "client.supernode_poll", "--active-poll", "0.25",
                              "--idle-poll", "3.0", "--active-window", "60.0"]
    for flag in ("--root-certificates", "--auth-supernode-private-key", "--superlink"):
        assert flag in supernode
    assert supernode[supernode.index("--isolation") + 1] == "process"
    assert supernode[supernode.index("--port") + 1] == "9199"
    node_config = parse_config_args([supernode[supernode.index("--node-config") + 1]])
    assert node_config["site"] == "hospital-a" and node_config["min-cohort"] == 5
    assert worker[1:3] == ["-m", "client.clientapp_worker"]
    assert worker[worker.index("--runtime-api-address") + 1] == "127.0.0.1:9199"


def test_start_superlink_print_only_writes_connection_flwr_reads(keyed, tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr-home"
    res = runner.invoke(app, [
        "coordinator", "start-superlink", "--certs", str(keyed / "certs"), "--port", "9193",
        "--flwr-home", str(home), "--print-only",
    ])
    assert res.exit_code == 0, res.output
    cmd = shlex.split(next(x[2:] for x in res.output.splitlines() if x.startswith("$ ")))
    assert "--enable-supernode-auth" in cmd and cmd[cmd.index("--port") + 1] == "9193"
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(keyed / "certs/ca.pem")
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection("fedmerge")
    assert conn.address == "127.0.0.1:9193"
    assert conn.root_certificates == str((keyed / "certs/ca.pem").resolve())


def test_submit_stages_app_and_run_config_rebuilds_the_recipe(tiny_parents, tmp_path):
    import tomllib

    from flwr.common.config import parse_config_args

    from server.recipe import recipe_from_run_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1]), "method": "linear",
        "groups": ["attention", "mlp"], "search": {"strategy": "adaptive", "tolerance": 0.1},
        "tune_fold": 1, "test_fold": 0,
    }))
    stage = tmp_path / "staged"
    res = runner.invoke(app, ["coordinator", "submit", str(recipe), "--out", str(tmp_path / "o"),
                              "--sites", "3", "--stage-dir", str(stage), "--print-only"])
    assert res.exit_code == 0, res.output
    cmd = shlex.split(next(x[2:] for x in res.output.splitlines() if x.startswith("$ ")))
    assert cmd[1:4] == ["run", str(stage), "fedmerge"]
    run_config = parse_config_args([cmd[cmd.index("--run-config") + 1]])
    declared = tomllib.loads((stage / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert set(run_config) <= set(declared["config"])  # else `flwr run` refuses the keys
    assert declared["components"]["clientapp"] == "client.client_app:app"
    assert (stage / "client/client_app.py").is_file() and not (stage / "tests").exists()
    rebuilt = recipe_from_run_config(run_config)
    assert rebuilt.groups == ("attention", "mlp") and rebuilt.search.strategy == "adaptive"
    assert rebuilt.search.tolerance == 0.1 and run_config["sites"] == 3
    assert (rebuilt.tune_fold, rebuilt.test_fold) == (1, 0)
    from common.model_io import fingerprint

    # The fingerprints the sites will be shown are the coordinator's parents' own.
    assert rebuilt.fingerprint_a == fingerprint(tiny_parents[0])
    assert rebuilt.fingerprint_b == fingerprint(tiny_parents[1])


def test_dry_run_prints_counts_and_fingerprints_offline(node_file, tiny_parents, monkeypatch):
    import socket

    from common.data import load_records
    from common.data.folds import select_fold
    from common.model_io import fingerprint

    def no_network(*a, **k):
        raise AssertionError("the dry run opened a socket")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    res = runner.invoke(app, ["node", "dry-run", str(node_file), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    records = load_records(f"jsonl:{node_file.parent / 'site.jsonl'}")
    assert report["records"] == len(records) == 40
    assert report["positives"] == sum(r.label for r in records)
    assert [f["records"] for f in report["folds"]] == [
        len(select_fold(records, f, 2, 0)) for f in (0, 1)
    ]
    assert report["parent_a_sha256"] == fingerprint(Path(tiny_parents[0]))
    assert report["parent_b_sha256"] == fingerprint(Path(tiny_parents[1]))
    assert report["node_key_fingerprint"].startswith("SHA256:")
    assert report["parameters"] > 0
    assert report["memory"].startswith("live model ") and "GB float32 on cpu" in report["memory"]
    assert "mapped" in report["memory"]


def test_dry_run_refuses_a_pem_key_flower_cannot_load(node_file, keyed, tmp_path):
    raw = yaml.safe_load(node_file.read_text())
    raw["connection"]["auth_private_key"] = str(keyed / "certs/ca.key")  # PEM, not OpenSSH
    raw["connection"]["root_certificates"] = str(keyed / "certs/ca.pem")
    raw["node"]["data"] = f"jsonl:{node_file.parent / 'site.jsonl'}"
    bad = tmp_path / "node.yaml"
    bad.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["node", "dry-run", str(bad)])
    assert isinstance(res.exception, FedmergeError)
    assert "auth_private_key" in str(res.exception) and "OpenSSH" in str(res.exception)


class _FakeClock:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_supernode_poll_is_fast_while_active_and_backs_off_to_idle():
    import time
    from itertools import pairwise

    from client.supernode_poll import AdaptivePoll

    clock = _FakeClock()
    poll = AdaptivePoll(0.25, 3.0, 10.0, clock=clock, sleeper=clock.sleep)
    poll.sleep(3)  # a fresh node is idle: Flower's own pace
    assert clock.sleeps == [3.0]
    poll.note_activity()  # a message arrived: fast for the whole window
    while clock.now - poll.last_activity < 10.0:
        poll.sleep(3)
    fast = clock.sleeps[1:]
    assert set(fast) == {0.25} and len(fast) == 40
    clock.sleeps.clear()
    for _ in range(12):  # then back off gradually, never beyond the idle poll
        poll.sleep(3)
    assert clock.sleeps[0] == 0.375 and clock.sleeps[-1] == 3.0
    assert all(b / a <= 1.5 + 1e-9 for a, b in pairwise(clock.sleeps))
    assert sorted(clock.sleeps) == clock.sleeps and clock.sleeps.count(3.0) >= 4
    clock.sleeps.clear()
    poll.sleep(0.5)  # waiting for the local reply while a message is served
    assert clock.sleeps == [0.25]
    poll.note_activity()
    poll.sleep(3)
    assert clock.sleeps[-1] == 0.25  # the next run's messages are picked up at once
    assert abs(poll.time() - time.time()) < 1.0  # everything else is the real module
    with pytest.raises(ValueError, match="active <= idle"):
        AdaptivePoll(1.0, 0.5)


def test_supernode_poll_install_hooks_flowers_loop(monkeypatch):
    import inspect

    import flwr
    from flwr.supernode import start_client_internal as sci

    from client import supernode_poll

    # The patch rests on the loop's shape in the pinned Flower: an empty pull sleeps 3 s, and
    # both steps are looked up as module globals on every iteration.
    loop = inspect.getsource(sci.start_client_internal)
    for part in ("run_id = _pull_and_store_message(", "time.sleep(3)", "_push_messages("):
        assert part in loop
    pulled = iter([None, 7])
    monkeypatch.setattr(sci, "time", sci.time)  # all three restored after the test
    monkeypatch.setattr(sci, "_pull_and_store_message", lambda **kw: next(pulled))
    monkeypatch.setattr(sci, "_push_messages", lambda **kw: None)
    poll = supernode_poll.install(0.05, 2.0, 30.0)
    assert sci.time is poll and poll.wait_s == 2.0
    assert sci._pull_and_store_message() is None and poll.last_activity == float("-inf")
    assert sci._pull_and_store_message() == 7 and poll.wait_s == 0.05
    before = poll.last_activity
    sci._push_messages()  # a reply left: the window restarts
    assert poll.last_activity >= before
    assert supernode_poll.split_args(
        ["--active-poll", "0.1", "--idle-poll", "5", "--superlink", "x:1"]
    ) == ({"active_s": 0.1, "idle_s": 5.0}, ["--superlink", "x:1"])
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(FedmergeError, match="flwr==1.41.0"):
        supernode_poll.install()


def test_worker_backoff_schedule():
    from client.clientapp_worker import next_wait

    kw = {"active": 0.05, "idle": 2.0, "window": 60.0}
    assert next_wait(2.0, 5.0, **kw) == 0.05  # a task 5 s ago: a round is under way
    waits, w = [], 0.05
    for _ in range(12):
        w = next_wait(w, 61.0, **kw)
        waits.append(w)
    assert waits[0] == pytest.approx(0.075) and waits[-1] == 2.0 and sorted(waits) == waits
    assert next_wait(2.0, float("inf"), **kw) == 2.0


def test_worker_polls_fast_after_a_task_then_backs_off(monkeypatch):
    from types import SimpleNamespace

    from client import clientapp_worker as cw

    clock = _FakeClock()
    monkeypatch.setattr(cw, "time", SimpleNamespace(monotonic=clock))
    worker = cw.ClientAppWorker("127.0.0.1:1", poll_interval=0.05, idle_poll_interval=1.0,
                                active_window=0.5)
    tokens = iter([None, None, "token", *[None] * 20])

    def acquire(client):
        token = next(tokens, None)
        if token is None and clock.sleeps and len(clock.sleeps) >= 22:
            worker.stop_event.set()
        return token

    ran = []
    monkeypatch.setattr(worker, "_client", lambda token: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(worker, "_acquire", acquire)
    monkeypatch.setattr(worker, "run_one", lambda token: ran.append(token) or SimpleNamespace(
        message_type="train", run_id=1, handler_s=0.0, pulled_s=0.0, pushed_s=0.0))
    monkeypatch.setattr(worker.stop_event, "wait", clock.sleep)
    worker.serve()
    assert ran == ["token"]
    assert clock.sleeps[:2] == [1.0, 1.0]  # idle before the task
    after = clock.sleeps[2:]
    assert after[:10] == [0.05] * 10  # the window after the task
    assert after[-1] == 1.0 and sorted(after) == after


def test_worker_stops_the_task_heartbeat_before_the_token_ends(monkeypatch):
    """A heartbeat after push_task_output gets 401, on which Flower's retry SIGINTs its own
    process: in the persistent worker that stopped the worker and hung the node."""
    from types import SimpleNamespace

    from flwr.supercore import heartbeat as hb
    from flwr.supernode.runtime import run_clientapp as rc

    from client import clientapp_worker as cw

    events = []

    class Sender:
        def __init__(self, fn):
            self.running = False

        def start(self):
            self.running = True

        @property
        def is_running(self):
            return self.running

        def stop(self):
            assert self.running
            self.running = False
            events.append("heartbeat stopped")

    message = SimpleNamespace(metadata=SimpleNamespace(message_type="query", group_id="policy"))
    run = SimpleNamespace(run_id=1, fab_id=cw.FEDMERGE_FAB_ID)
    monkeypatch.setattr(hb, "HeartbeatSender", Sender)
    monkeypatch.setattr(hb, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(rc, "pull_task_input", lambda client: (message, "ctx", run, None))
    monkeypatch.setattr(rc, "push_message", lambda *a: events.append("reply pushed"))
    monkeypatch.setattr(rc, "push_task_output", lambda *a: events.append("task finished"))
    worker = cw.ClientAppWorker("127.0.0.1:1", app_loader=lambda: lambda **kw: "reply")
    monkeypatch.setattr(worker, "_client", lambda token: SimpleNamespace(close=lambda: None))
    worker.stats_path = None
    rec = worker.run_one("token")
    assert rec.ok and events == ["reply pushed", "heartbeat stopped", "task finished"]


def test_a_refused_task_heartbeat_does_not_stop_the_worker(monkeypatch):
    """A heartbeat the SuperNode does not accept (task finished, token gone) makes Flower's
    own heartbeat raise SIGINT, which would stop the whole worker; ours does not."""
    import signal

    from flwr.proto.runtime_pb2 import SendTaskHeartbeatResponse

    from client.clientapp_worker import task_heartbeat_fn

    raised = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)

    class RefusingClient:
        def SendTaskHeartbeat(self, request):  # noqa: N802 - Flower's method name
            return SendTaskHeartbeatResponse(success=False)

    assert task_heartbeat_fn(RefusingClient())() is True
    assert raised == []
    # Flower's own function, for contrast: it signals the process.
    from flwr.supercore.heartbeat import make_task_heartbeat_fn_http

    make_task_heartbeat_fn_http(RefusingClient())()
    assert raised == [signal.SIGINT]


def test_dry_run_warns_about_coordinator_shipped_code(node_file, tmp_path):
    raw = yaml.safe_load(node_file.read_text())
    raw["connection"].update(app_source="fab", isolation="subprocess")
    for key in ("root_certificates", "auth_private_key"):
        raw["connection"][key] = str(node_file.parent / raw["connection"][key])
    raw["node"]["data"] = f"jsonl:{node_file.parent / 'site.jsonl'}"
    risky = tmp_path / "node.yaml"
    risky.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["node", "dry-run", str(risky), "--json"])
    assert res.exit_code == 0, res.output
    warnings = json.loads(res.output[res.output.index("{"):])["warnings"]
    assert any("app_source: fab" in w for w in warnings)
    assert any("isolation: subprocess" in w for w in warnings)


def test_a_policy_typo_is_an_error_not_a_default(node_file):
    raw = yaml.safe_load(node_file.read_text())
    raw["node"]["policy"] = {"min_site": 5}
    typo = node_file.parent / "node-typo.yaml"  # a copy: the fixture is shared by the module
    typo.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["node", "dry-run", str(typo)])
    assert isinstance(res.exception, FedmergeError)
    assert "field 'node.policy.min_site': unknown key" in str(res.exception)


def test_dry_run_prints_the_whole_sha256_on_a_narrow_terminal(node_file, tiny_parents):
    from common.model_io import fingerprint

    raw = yaml.safe_load(node_file.read_text())
    raw["node"]["policy"] = {"min_cohort": 5, "min_positives": 1}  # another test edits it
    narrow = node_file.with_name("narrow.yaml")
    narrow.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["node", "dry-run", str(narrow)], env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    assert f"parent A sha256 {fingerprint(Path(tiny_parents[0]))}" in res.output
    assert f"parent B sha256 {fingerprint(Path(tiny_parents[1]))}" in res.output


def test_node_ledger_lists_every_release_and_the_epsilon_spent(node_file, tmp_path):
    """`fedmerge node ledger`: what a hospital's operator reads to see its budget; the ε it
    prints is the ledger's own composition (the number a next run is checked against)."""
    from client.ledger import Release, ReleaseLedger, epsilon_spent
    from common.dp.accounting import Gaussians, epsilon_of

    raw = yaml.safe_load(node_file.read_text())
    with_ledger = node_file.parent / "node-with-ledger.yaml"
    raw["node"]["ledger"] = str(tmp_path / "releases.jsonl")
    raw["node"]["policy"] = {"min_cohort": 5, "min_positives": 1,
                             "privacy": {"max_epsilon_total": 20.0, "max_delta": 1e-6}}
    with_ledger.write_text(yaml.safe_dump(raw))
    ledger = ReleaseLedger(tmp_path / "releases.jsonl")
    for fold, count in ((0, 11), (1, 2)):  # one run: 11 tuning candidates, 2 held out
        ledger.record(Release(time=1_700_000_000.0 + fold, run=7, round=fold + 1,
                              stage="tune" if fold == 0 else "test", fold=fold, folds=2,
                              fold_seed=0, terms="abcdef0123456789",
                              candidates=tuple(f"[{i / 10}]" for i in range(count)), sites=4,
                              rho=count / (2 * 3.0**2), sigma=3.0, tau=0.0))
    # An exact run's release over 4 sampled sites, and the sum its UNMASK settled (3 summed):
    # a "summed" row, neither a release nor a charge.
    exact = Release(time=1_700_000_100.0, run=8, round=1, stage="tune", fold=0, folds=2,
                    fold_seed=0, terms="fedcba9876543210", candidates=("[0.5]",), sites=4)
    ledger.record(exact)
    ledger.record(exact.model_copy(update={"kind": "sum", "sites": 3, "time": 1_700_000_101.0}))
    entries = ledger.entries()
    res = runner.invoke(app, ["node", "ledger", str(with_ledger), "--json"])
    assert res.exit_code == 0, res.output
    assert [Release.model_validate_json(line) for line in res.output.splitlines()] == entries
    res = runner.invoke(app, ["node", "ledger", str(with_ledger)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    spent = epsilon_spent(entries, 1e-6)
    # The folds of one partition are parallel: a patient is charged its own fold's releases,
    # at most the tuning fold's 11 (not 13).
    assert spent == pytest.approx(epsilon_of([Gaussians(3.0, 11)], 1e-6)[0], rel=1e-9)
    assert f"ε spent {spent:.3g} of 20 (δ = 1e-06" in res.output
    assert "(3 releases)" in res.output and "test" in res.output
    rows = [line for line in res.output.splitlines() if "fedcba987654" in line]
    assert len(rows) == 2 and "summed" not in rows[0] and "tune: summed" in rows[1]
    assert " 4 " in rows[0] and " 3 " in rows[1]  # sampled, then summed
    # A node file without a ledger: one error naming the field.
    res = runner.invoke(app, ["node", "ledger", str(node_file)])
    assert isinstance(res.exception, FedmergeError)
    assert str(node_file) in str(res.exception) and "'node.ledger': not set" in str(res.exception)

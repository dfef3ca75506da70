"""Faults on Flower's deployment engine: a hospital killed mid-run, a run stopped mid-run.

One real SuperLink (TLS + node authentication) and five hospital SuperNodes, each with its
persistent worker, on 127.0.0.1 run three tunings one after the other:

A. hospital-e runs as operators run it (`fedmerge node start`; `node status` says
   connected). It is stalled in its first scoring task, then its `node start` gets SIGTERM
   (what systemd and docker send): no fedmerge or Flower process of it may remain,
   `node status` says stopped, and the run must finish with the other four and report
   hospital-e as a dropout ("still scoring after ..."), its figures covering exactly the
   four sites' tuning folds.
B. A run on the four is stopped with `flwr stop` once its first SecAgg+ round is under way
   (hospital-a stalls a little in `share_keys`, so a worker holds a task of the run when it
   is stopped): it must end as stopped, with no report.
C. The next run must complete with the same four nodes and workers. (A stop used to SIGINT
   the workers, so every later run failed with "announcement: 0 of N sites accepted".)
D. `fedmerge coordinator submit` of a slerp recipe that hospital-d's policy refuses
   (`methods: [linear]`), needing all four sites: the command waits, fails, and the run's
   report.json names the stage, the rule and the site.

Everything runs inside one module fixture that stops every process before any assertion,
so a failing test never leaves a Flower process (or a port) behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from deploy_support import NodeService, alive, descendants, node_file, write_cohort

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")
KILLED = "hospital-e"
LIVE = SITES[:-1]
COHORT = "synthetic:sites=5,stays=40/40/40/40/40,seed=11"
POLICY = {"min_cohort": 5, "min_positives": 0}
SCORE_TIMEOUT = 8.0
RECIPE = {
    "method": "linear",
    "search": {"strategy": "grid", "grid_points": 3},
    "secagg": {"timeout": 30.0},
    "score_timeout": SCORE_TIMEOUT,
}
POLICIES = {"hospital-d": {**POLICY, "methods": ["linear"]}}
FAULTS = {
    KILLED: "slow:score:60",  # still on candidate 0 of round 1 when it is killed
    "hospital-a": "slow:share_keys:3",  # holds a SecAgg+ task when run B is stopped
}


def _received(log: str, run_id: int, message_type: str) -> int:
    """How many `message_type` messages of run `run_id` a SuperNode's log says it received."""
    pattern = (
        rf"\[RUN {run_id}, ROUND [^\]]*\][^\n]*\n[^\n]*Receiving: {re.escape(message_type)} "
        "message"
    )
    return len(re.findall(pattern, log))


def _wait_until(what: str, cond, timeout: float, poll: float = 0.25) -> float:
    """Poll `cond` until true; the seconds it took. TimeoutError naming `what` otherwise."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(poll)
    raise TimeoutError(f"{what}: not after {timeout:.0f}s")


@pytest.fixture(scope="module")
def faults(tmp_path_factory, tiny_parents):
    from client.node_file import load_node_file, node_config_values
    from common.data.folds import select_fold
    from common.flower_runtime import flower_exe
    from server.deployment import run_config_for, stage_app
    from server.recipe import validate_recipe
    from simulation.local_deployment import CONNECTION, LocalDeployment

    root = tmp_path_factory.mktemp("deploy-faults")
    data_root = root / "data"
    data_root.mkdir()
    _, site_files, site_names, site_parts = write_cohort(data_root, COHORT)
    site_of = dict(zip(SITES, site_names, strict=True))
    recipe = validate_recipe(
        {**RECIPE, "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1])}
    )
    stats = root / "worker-stats.jsonl"
    result: dict = {"t0": time.monotonic(), "site_of": site_of}
    # The tuning fold of the four sites that stay: what run A's figures must cover.
    result["live_tune_n"] = sum(
        len(select_fold(part, recipe.tune_fold, recipe.folds, recipe.fold_seed))
        for name, part in zip(SITES, site_parts, strict=True) if name != KILLED
    )
    os.environ["FEDMERGE_WORKER_STATS"] = str(stats)
    dep = LocalDeployment(root / "site", app_dir=Path(__file__).resolve().parents[1])
    phases = result["phases"] = {}

    def mark(name: str) -> None:
        phases[name] = time.monotonic() - result["t0"]

    def submit(name: str, sites: int) -> tuple[int, Path]:
        out = root / f"report-{name}"
        run_config = run_config_for(recipe, out, sites=sites)
        staged = stage_app(dep.app_dir, root / f"staged-{name}", run_config)
        run_id = dep.submit(run_config, app_dir=staged)
        result[f"run_{name}"] = run_id
        mark(f"{name} submitted")
        return run_id, out

    def log(name: str) -> str:
        if name == KILLED:
            return (service.state / "supernode.log").read_text(errors="replace")
        return dep.nodes[name].supernode.log_text()

    service: NodeService | None = None

    def flow() -> None:
        nonlocal service
        dep.make_certs(list(SITES))
        dep.start_superlink()
        dep.register(*SITES)
        for name, site, data in zip(SITES, site_names, site_files, strict=True):
            nf = node_file(data_root / f"{name}.yaml", site, data, tiny_parents,
                           dep.connection(name), POLICIES.get(name, POLICY),
                           FAULTS.get(name, ""))
            if name == KILLED:
                service = NodeService(nf)
            else:
                dep.start_node(name, node_config_values(load_node_file(nf)))
        mark("nodes started")

        # -- A: hospital-e dies while it scores candidate 0 of round 1 ------------------
        run_a, out_a = submit("a", sites=len(SITES))
        service.wait_for("running: connected", 90)
        result["status_e_connected"] = service.status()
        _wait_until(
            f"{KILLED} receives its first query.score",
            lambda: _received(log(KILLED), run_a, "query.score") >= 1, timeout=120,
        )
        time.sleep(2.0)  # its worker claims the task and stalls in it (60 s)
        tree = descendants([service.proc.pid])
        result["tree_e"] = tree
        service.proc.send_signal(signal.SIGTERM)
        result["sigterm_rc"] = service.proc.wait(30)
        result["left_e"] = {p: n for p, n in tree.items() if alive(p)}
        result["status_e_stopped"] = service.status()
        mark("a: e stopped")
        dep.wait_for_file(out_a / "report.json", run_a, timeout=150)
        mark("a reported")
        result["report_a"] = json.loads((out_a / "report.json").read_text())
        _wait_until("run A finishes", lambda: dep.run_status(run_a).startswith("finished"),
                    timeout=30, poll=1.0)

        # -- B: stopped once its first SecAgg+ round is under way ------------------------
        run_b, out_b = submit("b", sites=len(LIVE))
        _wait_until(
            "hospital-a receives run B's share_keys stage",
            lambda: _received(log("hospital-a"), run_b, "train") >= 2, timeout=120,
        )
        time.sleep(1.0)  # hospital-a's worker is inside its 3 s share_keys stall
        stop = dep.flwr([flower_exe("flwr"), "stop", str(run_b), CONNECTION])
        result["stop_rc"], result["stop_out"] = stop.returncode, stop.stdout + stop.stderr
        mark("b stopped")
        _wait_until("run B ends", lambda: dep.run_status(run_b).startswith("finished"),
                    timeout=60, poll=1.0)
        result["status_b"] = dep.run_status(run_b)
        result["received_b"] = {n: _received(log(n), run_b, "train") for n in LIVE}

        # -- C: right after, on the same four nodes and workers ---------------------------
        run_c, out_c = submit("c", sites=len(LIVE))
        dep.wait_for_file(out_c / "report.json", run_c, timeout=150)
        result["report_c"] = json.loads((out_c / "report.json").read_text())
        result["report_b_exists"] = (out_b / "report.json").exists()
        mark("c reported")

        # -- D: one site refuses; `coordinator submit` waits and the report says why --------
        recipe_d = root / "recipe-d.yaml"
        recipe_d.write_text(yaml.safe_dump({
            **RECIPE, "method": "slerp", "min_sites": len(LIVE),
            "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1]),
        }))
        out_d = root / "report-d"
        submitted = subprocess.run(
            [sys.executable, "-m", "common.cli", "coordinator", "submit", str(recipe_d),
             "--out", str(out_d), "--sites", str(len(LIVE)), "--connection", CONNECTION,
             "--flwr-home", str(dep.home), "--app-dir", str(dep.app_dir),
             "--stage-dir", str(root / "staged-d")],
            capture_output=True, text=True, timeout=240,
        )
        result["submit_d"] = (submitted.returncode, submitted.stdout + submitted.stderr)
        result["report_d"] = json.loads((out_d / "report.json").read_text())
        mark("d failed")
        result["live_before_close"] = {
            n: (dep.nodes[n].supernode.poll(), dep.nodes[n].worker.poll()) for n in LIVE
        }
        result["pids"] = descendants([p.pid for p in dep.procs.procs])

    try:
        flow()
    except BaseException:
        print(dep.tails(40))
        raise
    finally:
        worker_logs = {n: dep.nodes[n].worker.log_text() for n in dep.nodes}
        result["tails"] = dep.tails(30)  # for the assertion messages below
        if service is not None:
            service.kill()
        dep.close()
        os.environ.pop("FEDMERGE_WORKER_STATS", None)
    mark("closed")
    print("deploy fault test phases (s):", {k: round(v, 1) for k, v in phases.items()})
    result["worker_logs"] = worker_logs
    result["alive_after_close"] = {p: n for p, n in result["pids"].items() if alive(p)}
    result["stats"] = [json.loads(line) for line in stats.read_text().splitlines()]
    return result


def test_killed_site_is_a_dropout_and_the_run_completes(faults):
    report, site_of = faults["report_a"], faults["site_of"]
    live = sorted(site_of[n] for n in LIVE)
    assert sorted(report["accepted_sites"]) == sorted(site_of.values())
    assert report["contributing_sites"] == live
    assert [d["site"] for d in report["dropouts"]] == [site_of[KILLED]]
    dropout = report["dropouts"][0]
    assert dropout["round"] == 1
    # Stopped, its node stops heartbeating: the SuperLink answers for it ("Node
    # Unavailable"), unless the scoring timeout runs out first.
    stalled = dropout["reason"].startswith(f"still scoring after {SCORE_TIMEOUT:g} s")
    assert stalled or dropout["reason"].startswith("Error: Node Unavailable"), dropout
    if stalled:
        assert "(0 of 3 done)" in dropout["reason"]
    assert report["refusals"] == []
    assert len(report["tune"]) == 3
    # The deployment default: distributed noise, within the sites' default ε per run.
    privacy = report["privacy"]
    assert privacy["mode"] == "distributed" and privacy["epsilon"] <= 8.0
    assert privacy["honest_sites"] == 3  # a strict majority of the 5 announced sites
    from common.metrics import NOISY_HISTOGRAM

    # The default with noise on (8 class-balanced bins).
    assert report["histogram"]["bins"] == NOISY_HISTOGRAM.bins == 8
    assert report["histogram"]["placement"] == NOISY_HISTOGRAM.placement
    tolerance = _n_tolerance(privacy, len(live), report["histogram"]["bins"])
    for fig in report["tune"]:
        assert abs(fig["n"] - faults["live_tune_n"]) <= tolerance, fig
        assert fig["sites"] == live
    first = report["rounds"][0]
    assert first["failed"] == [site_of[KILLED]] and first["sites"] == live
    if stalled:  # the round waited for its first candidate (twice the per-candidate timeout)
        assert first["scoring_seconds"] >= 2 * SCORE_TIMEOUT - 1


def test_sigterm_stops_the_whole_node_and_status_says_so(faults):
    connected, stopped = faults["status_e_connected"], faults["status_e_stopped"]
    assert connected["exit"] == 0 and connected["status"]["state"] == "connected"
    assert connected["status"]["node_id"] is not None
    assert faults["sigterm_rc"] == 0
    names = set(faults["tree_e"].values())
    assert len(faults["tree_e"]) >= 3 and any("python" in n for n in names), names
    assert faults["left_e"] == {}  # no fedmerge or Flower process of hospital-e remains
    assert stopped["exit"] == 3 and not stopped["running"]
    assert (stopped["status"]["state"], stopped["status"]["cause"]) == (
        "stopped", "stopped by SIGTERM")
    assert [r["outcome"] for r in stopped["runs"]] == ["accepted"]  # run A, never finished


def test_a_refused_run_leaves_a_report_naming_stage_rule_and_site(faults):
    code, output = faults["submit_d"]
    refusing = faults["site_of"]["hospital-d"]
    report = faults["report_d"]
    assert code == 1, output
    assert report["status"] == "failed" and report["stage"] == "announcement"
    assert report["cause"] == "too-few-sites"
    assert report["rules"] == {refusing: "policy:method-not-allowed"}
    assert report["sites_missing"] == [refusing]
    assert len(report["sites_answered"]) == len(LIVE) - 1
    assert f"refused by {refusing}: policy:method-not-allowed" in output
    assert "follow it:  flwr log" in output and "stop it:    flwr stop" in output


def test_stopped_run_ends_stopped_without_a_report(faults):
    assert faults["stop_rc"] == 0, faults["stop_out"]
    assert "stopped" in faults["status_b"], faults["status_b"]
    assert not faults["report_b_exists"]
    # It was stopped inside its first SecAgg+ round (setup and share_keys had gone out).
    assert faults["received_b"]["hospital-a"] >= 2


def test_run_after_a_stop_completes_with_the_same_nodes(faults):
    report, site_of = faults["report_c"], faults["site_of"]
    live = sorted(site_of[n] for n in LIVE)
    assert report["contributing_sites"] == live, faults["tails"]
    assert report["dropouts"] == []
    # hospital-e's node id may still be listed online when C starts; nothing else refuses.
    assert all(r["site"].startswith("node-") for r in report["refusals"]), report["refusals"]
    assert len(report["tune"]) == 3
    tolerance = _n_tolerance(report["privacy"], len(live), report["histogram"]["bins"])
    assert all(abs(fig["n"] - faults["live_tune_n"]) <= tolerance for fig in report["tune"])
    assert report["lambda_star"] is not None


def test_workers_served_every_run_in_one_process(faults):
    """The stop neither stopped nor restarted a worker: one pid per node across A, B and C."""
    assert faults["live_before_close"] == {n: (None, None) for n in LIVE}
    by_node: dict[str, set[int]] = {}
    runs: dict[str, set[int]] = {}
    for rec in faults["stats"]:
        by_node.setdefault(rec["address"], set()).add(rec["pid"])
        runs.setdefault(rec["address"], set()).add(rec["run_id"])
    assert all(len(pids) == 1 for pids in by_node.values()), by_node
    run_a, run_c = faults["run_a"], faults["run_c"]
    served_both = [a for a, r in runs.items() if {run_a, run_c} <= r]
    assert len(served_both) == len(LIVE), runs
    for name in LIVE:
        assert "ready: serving" in faults["worker_logs"][name]
        assert faults["worker_logs"][name].count("ready: serving") == 1  # never restarted


def test_processes_all_stopped(faults):
    assert len(faults["pids"]) >= 8  # superlink, superexec, serverapp?, 4 nodes, 4 workers
    assert faults["alive_after_close"] == {}


def test_stop_all_reaches_a_process_that_left_the_group(tmp_path):
    """As flower-superlink does with flower-superexec: a child in a session of its own,
    which ignores SIGTERM, is still gone when `stop_all` returns."""
    import sys

    from common.processes import ProcSet

    script = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'],"
        " start_new_session=True); time.sleep(120)"
    )
    procs = ProcSet()
    leader = procs.start("parent", [sys.executable, "-c", script], env=dict(os.environ),
                         log_path=tmp_path / "parent.log")
    _wait_until("the detached child starts", lambda: len(descendants([leader.pid])) == 2, 30)
    child = next(p for p in descendants([leader.pid]) if p != leader.pid)
    assert os.getsid(child) != os.getsid(leader.pid)
    procs.stop_all(grace=1.0)
    assert not alive(child) and not alive(leader.pid)


def _n_tolerance(privacy: dict, summed_sites: int, bins: int) -> float:
    """Six standard deviations of the noise in a noisy n (2 x bins counts, each carrying
    `summed_sites` site draws of scale sigma_site)."""
    return 6.0 * (2 * bins * summed_sites) ** 0.5 * privacy["sigma_site"]

"""End to end on Flower's deployment engine: a real SuperLink (TLS + node authentication)
and three real hospital SuperNodes on 127.0.0.1 run a tuning whose report must equal the
same tuning in simulation; an unregistered node key and a node trusting another CA are
refused, each with one plain line. hospital-a, the rogue and the untrusting node run as
operators run them, `fedmerge node start NODE_FILE`: hospital-a says "running" once
connected (with the node id the SuperLink lists), `node status` shows its run finished, and
SIGTERM stops it and everything it started.

Everything runs inside one module fixture that stops every process before any assertion,
so a failing test never leaves a Flower process (or a port) behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from deploy_support import NodeService, alive, descendants, node_file, write_cohort

pytestmark = [pytest.mark.slow, pytest.mark.deploy]

SITES = ("hospital-a", "hospital-b", "hospital-c")
SERVICE = "hospital-a"  # started with `fedmerge node start`
COHORT = "synthetic:sites=3,stays=60/60/60,seed=7"
# Exact sums on both sides, so the deployment's report can equal the simulation's bit for bit
# (deployments default to distributed noise: test_deploy_faults runs with it).
POLICY = {"min_cohort": 5, "min_positives": 1, "privacy": {"min_mode": "off"}}
RECIPE = {
    "privacy": {"mode": "off"},
    "method": "linear",
    "search": {"strategy": "grid", "grid_points": 3},
    "secagg": {"timeout": 60.0},
}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_parents):
    from client.node_file import load_node_file, node_config_values
    from common.flower_runtime import flower_exe
    from server.deployment import run_config_for, stage_app
    from server.recipe import validate_recipe
    from simulation.local_deployment import CONNECTION, LocalDeployment
    from simulation.runner import run_simulation

    root = tmp_path_factory.mktemp("deploy")
    data_root = root / "data"
    data_root.mkdir()
    union, site_files, site_names, _ = write_cohort(data_root, COHORT)
    recipe = validate_recipe(
        {**RECIPE, "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1])}
    )
    out = root / "report"
    stats = root / "worker-stats.jsonl"
    result: dict = {"t0": time.monotonic()}
    os.environ["FEDMERGE_WORKER_STATS"] = str(stats)
    dep = LocalDeployment(root / "site", app_dir=Path(__file__).resolve().parents[1])
    phases = result["phases"] = {}

    def mark(name: str) -> None:
        phases[name] = time.monotonic() - result["t0"]

    services: dict[str, NodeService] = {}

    def deploy_flow() -> None:
        """Coordinator and hospitals, as operators would run them (threads only wait here)."""
        from common.certs import create_ca

        dep.make_certs([*SITES, "rogue", "no-ca"])
        create_ca(root / "other-ca")  # what the "no-ca" node wrongly trusts
        dep.start_superlink()
        mark("superlink")
        dep.register(*SITES, "no-ca")  # the rogue key is never registered
        mark("registered")
        for name, site, data in zip(SITES, site_names, site_files, strict=True):
            nf = node_file(data_root / f"{name}.yaml", site, data, tiny_parents,
                           dep.connection(name), POLICY)
            if name == SERVICE:
                services[name] = NodeService(nf)
            else:
                dep.start_node(name, node_config_values(load_node_file(nf)))
        for name, extra in (("rogue", {}),
                            ("no-ca", {"root_certificates": str(root / "other-ca/ca.pem")})):
            nf = node_file(data_root / f"{name}.yaml", name, site_files[0], tiny_parents,
                           dep.connection(name), POLICY, max_retries=1, **extra)
            services[name] = NodeService(nf)
        run_config = run_config_for(recipe, out, sites=3)
        staged = stage_app(dep.app_dir, root / "staged-app", run_config)
        run_id = dep.submit(run_config, app_dir=staged)
        mark("submitted")
        node = services[SERVICE]
        result["running_line"] = next(
            line for line in node.wait_for("running: ", 90).splitlines()
            if line.startswith("running: ")
        )
        result["status_connected"] = node.status()
        listed = dep.flwr([flower_exe("flwr"), "supernode", "list", CONNECTION, "--format",
                           "json"])
        result["supernode_list"] = listed.stdout
        dep.wait_for_file(out / "report.json", int(run_id), timeout=170)
        mark("deployed")
        result["report"] = json.loads((out / "report.json").read_text())
        for name in ("rogue", "no-ca"):
            svc = services[name]
            try:
                result[f"{name}_rc"] = svc.proc.wait(30)
            except Exception:  # still retrying: recorded; the assertion will say so
                result[f"{name}_rc"] = None
            result[f"{name}_out"] = svc.output()
            result[f"{name}_log"] = (svc.state / "supernode.log").read_text()
        result["status_after_run"] = node.status()
        tree = descendants([node.proc.pid])
        node.proc.send_signal(signal.SIGTERM)
        result["sigterm_rc"] = node.proc.wait(30)
        result["left_after_sigterm"] = {p: n for p, n in tree.items() if alive(p)}
        result["status_stopped"] = node.status()
        result["node_out"] = node.output()
        result["site_log"] = (node.state / "site.log").read_text()
        mark("node stopped")
        result["pids"] = set(descendants([p.pid for p in dep.procs.procs]))

    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            flow = pool.submit(deploy_flow)
            # Meanwhile (the deployment mostly waits on Flower's polling), the same tuning
            # in simulation on the union of the sites' data. Ray wants the main thread.
            sim = run_simulation(
                data=f"jsonl:{union}", split="region", parents=tiny_parents,
                method="linear", search="grid", out=root / "sim", recipe_fields=RECIPE,
                node_overrides={i: {"min-cohort": 5, "min-positives": 1} for i in range(3)},
            )
            result["sim_report"] = json.loads((sim.out / "report.json").read_text())
            mark("simulated")
            flow.result(timeout=240)
    except BaseException:
        print(dep.tails())
        raise
    finally:
        for svc in services.values():
            svc.kill()
        dep.close()  # also unblocks a deploy_flow still waiting (its processes are gone)
        os.environ.pop("FEDMERGE_WORKER_STATS", None)
    result["phases"]["closed"] = time.monotonic() - result["t0"]
    print("deploy test phases (s):", {k: round(v, 1) for k, v in result["phases"].items()})
    result["alive_after_close"] = {p for p in result.get("pids", set()) if alive(p)}
    result["stats"] = [json.loads(line) for line in stats.read_text().splitlines()]
    result["seconds"] = time.monotonic() - result["t0"]
    return result


def test_deploy_report_equals_simulation(deployed):
    dep, sim = deployed["report"], deployed["sim_report"]
    assert len(dep["tune"]) == 3
    for d, s in zip(dep["tune"], sim["tune"], strict=True):
        assert d["lambda"] == s["lambda"]
        for key in ("auroc", "auprc", "n", "positives"):
            assert d[key] == s[key], (key, d, s)
    assert dep["lambda_star"] == sim["lambda_star"]
    for name in ("lambda_star", "parent_a", "parent_b"):
        for key in ("auroc", "auprc", "n", "positives"):
            assert dep["test"][name][key] == sim["test"][name][key], (name, key)
    assert sorted(dep["contributing_sites"]) == sorted(sim["contributing_sites"])
    assert len(dep["contributing_sites"]) == 3
    assert dep["refusals"] == [] and dep["dropouts"] == []
    total = sum(t["n"] for t in (dep["test"]["parent_a"], dep["tune"][0]))
    assert total == 180  # both folds together cover every stay of the three hospitals


def test_deploy_unregistered_key_is_refused_in_one_plain_line(deployed):
    assert deployed["rogue_rc"] == 1
    assert "Failed to activate SuperNode" in deployed["rogue_log"]
    assert "Exit Code: 305" in deployed["rogue_log"]
    assert "rogue" not in deployed["report"]["contributing_sites"]
    errors = [x for x in deployed["rogue_out"].splitlines() if x.startswith("error: ")]
    assert len(errors) == 1, deployed["rogue_out"]
    assert re.fullmatch(
        r"error: the SuperLink at 127\.0\.0\.1:\d+ refused this node's key \S+rogue\.key "
        r"\(SHA256:\S+\): it is not registered there; the coordinator must run `fedmerge "
        r"coordinator register-node rogue\.pub --name rogue` with the rogue\.pub you sent",
        errors[0]), errors[0]
    assert "running:" not in deployed["rogue_out"]


def test_deploy_node_trusting_another_ca_names_the_file(deployed):
    assert deployed["no-ca_rc"] == 1
    assert "CERTIFICATE_VERIFY_FAILED" in deployed["no-ca_log"]
    errors = [x for x in deployed["no-ca_out"].splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "other-ca/ca.pem (connection.root_certificates) does not " \
        "trust: get the coordinator's ca.pem" in errors[0], deployed["no-ca_out"]
    assert "\x1b[" not in deployed["no-ca_log"]  # plain text, no colour codes


def test_deploy_node_service_connects_reports_and_stops(deployed):
    """`fedmerge node start`: "running" with the node id the SuperLink lists; `node status`
    says connected, then (after the run) the run finished, then (after SIGTERM) stopped."""
    m = re.match(r"running: connected to 127\.0\.0\.1:\d+ as node (\d+); logs in ",
                 deployed["running_line"])
    assert m, deployed["running_line"]
    node_id = int(m.group(1))
    assert f'"node-id": "{node_id}"' in deployed["supernode_list"], deployed["supernode_list"]
    connected = deployed["status_connected"]
    assert connected["exit"] == 0 and connected["running"]
    assert connected["status"]["state"] == "connected"
    assert connected["status"]["node_id"] == node_id
    runs = deployed["status_after_run"]["runs"]
    assert [(r["outcome"], r["rounds"]) for r in runs] == [("finished", 2)], runs
    stopped = deployed["status_stopped"]
    assert stopped["exit"] == 3 and not stopped["running"]
    assert stopped["status"]["state"] == "stopped"
    assert deployed["sigterm_rc"] == 0 and deployed["left_after_sigterm"] == {}
    assert "stopped (SIGTERM): SuperNode and worker are gone" in deployed["node_out"]
    # The site's own log: one structured line per run and round, codes and numbers only.
    events = [dict(kv.split("=", 1) for kv in line.split()[1:])
              for line in deployed["site_log"].splitlines()]
    assert [e["event"] for e in events] == [
        "accepted", "round", "released", "round", "released", "finished"]
    released = [e for e in events if e["event"] == "released"]
    assert [int(e["vector"]) > 0 and e["sites"] == "3" for e in released] == [True, True]
    assert len(events[0]["fingerprints"]) == 25  # two 12-character prefixes


def test_deploy_worker_keeps_state_across_messages(deployed):
    """One long-lived worker per hospital ran every message (no process per message)."""
    by_node: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for rec in deployed["stats"]:
        assert rec["ok"], rec
        by_node.setdefault(rec["address"], set()).add(rec["pid"])
        counts[rec["address"]] = counts.get(rec["address"], 0) + 1
    assert len(by_node) == 3, by_node
    assert all(len(pids) == 1 for pids in by_node.values())
    assert all(n >= 5 for n in counts.values())  # announcement + SecAgg+ stages per round


def test_deploy_processes_all_stopped(deployed):
    # superlink, superexec, serverapp?, 2 nodes, 2 workers (the rest ran under `node start`)
    assert len(deployed["pids"]) >= 5
    assert deployed["alive_after_close"] == set()

"""Seconds per tuning round in deployment vs simulation, and the share of a deployed round
spent outside scoring.

Both runs do the same work: three hospitals (a seeded synthetic cohort split by site), the
same two parents, the same grid. The deployment is real (SuperLink with TLS and node
authentication, three SuperNodes in process isolation with fedmerge's persistent worker) on
127.0.0.1. Round times come from the coordinator (`bench/timed_server_app.py` logs round start
and end); scoring time per round is the slowest hospital's ClientApp handler time for that
round (the worker logs it), since hospitals score in parallel.

Before the run is submitted, with every node connected and its worker warmed up, it samples
the CPU time of each process group over `--idle-window` seconds: a hospital node runs for
months mostly idle, and its polling must cost next to nothing (target: under 1% of a core
per node, SuperLink under 5% with 10 nodes). `first_round_start_s` (submit to the first
round's start: `flwr run`, the ServerApp's start and the announcement exchange) shows that
runs still start quickly after the idle back-off.

    python bench/deploy_round.py                 # ~30M-parameter parents
    python bench/deploy_round.py --model tiny    # when the machine is busy
    python bench/deploy_round.py --idle-only --nodes 10   # idle cost only, no run

Last line: one JSON object with deploy_round_s, sim_round_s, outside_scoring_fraction,
idle_node_cpu (mean over nodes of one node's SuperNode + worker, in cores), idle_node_cpu_max,
idle_link_cpu (SuperLink and its children, in cores), first_round_start_s and first_task_s
(submit to the last node claiming its first message).
Target: outside_scoring_fraction <= 0.2 for the ~30M model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.flower_runtime import set_offline_defaults  # noqa: E402

set_offline_defaults()

MODELS = {
    # ~30M parameters with the cohort's word vocabulary (printed below).
    "30m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=9,
                num_attention_heads=8, num_key_value_heads=4),
    "tiny": {},
}


def build_parents(root: Path, texts: list[str], model: str) -> tuple[Path, Path, int]:
    from common.tiny_models import build_tiny_llama, train_word_tokenizer

    tok = train_word_tokenizer(texts)
    a = build_tiny_llama(root / "parent_a", tok, seed=1, **MODELS[model])
    b = build_tiny_llama(root / "parent_b", tok, seed=2, **MODELS[model])
    from transformers import AutoConfig, AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(a)).parameters())
    return a, b, n


def write_sites(root: Path, spec: str) -> tuple[Path, list[Path], list[str], list[str]]:
    from common.data import load_records
    from common.data.splits import split_records, write_site_files

    records = load_records(spec)
    names, parts = split_records(records, "region", None, 0)
    union, files = write_site_files(root, names, parts)
    return union, files, names, [r.text for r in records]


def round_spans(events: list[dict]) -> dict[int, float]:
    start = {e["round"]: e["t"] for e in events if e["event"] == "round_start"}
    return {e["round"]: e["t"] - start[e["round"]] for e in events
            if e["event"] == "round_end" and e["round"] in start}


def _cpu_seconds(leaders: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process in the leaders' trees, by pid."""
    import psutil

    out: dict[int, float] = {}
    for pid in leaders:
        try:
            tree = psutil.Process(pid)
            procs = [tree, *tree.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return out


def cpu_use(groups: dict[str, list[int]], window: float) -> dict[str, float]:
    """Cores each group of process trees used over `window` seconds (a pid born during the
    window counts from zero; one that died is dropped, which only undercounts)."""
    before = {g: _cpu_seconds(pids) for g, pids in groups.items()}
    t0 = time.monotonic()
    time.sleep(window)
    after = {g: _cpu_seconds(pids) for g, pids in groups.items()}
    elapsed = time.monotonic() - t0
    return {g: sum(t - before[g].get(pid, 0.0) for pid, t in after[g].items()) / elapsed
            for g in groups}


def wait_until_idle(dep, timeout: float = 600.0, settle: float = 5.0) -> float:
    """Until every SuperNode has connected and every worker has warmed up (imported torch and
    the app), plus `settle` seconds. Returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all("SuperNode ID" in n.supernode.log_text()
               and (n.worker is None or "ready: serving" in n.worker.log_text())
               for n in dep.nodes.values()):
            time.sleep(settle)
            return time.monotonic() - t0
        time.sleep(1.0)
    raise TimeoutError(f"nodes not ready after {timeout:.0f}s\n{dep.tails()}")


def measure_idle(dep, window: float) -> dict:
    """Idle cost in cores: each node's SuperNode + worker trees, and the SuperLink's tree."""
    groups = {name: [n.supernode.pid] + ([n.worker.pid] if n.worker else [])
              for name, n in dep.nodes.items()}
    used = cpu_use({**groups, "superlink": [dep.superlink.pid]}, window)
    nodes = [used[name] for name in groups]
    return {"idle_node_cpu": sum(nodes) / len(nodes), "idle_node_cpu_max": max(nodes),
            "idle_link_cpu": used["superlink"], "idle_nodes": len(nodes),
            "idle_window_s": window}


def run_deploy(root: Path, parents, site_files, site_names, recipe, policy, *,
               idle_window: float, idle_only: bool = False) -> dict:
    from server.deployment import run_config_for, stage_app
    from simulation.local_deployment import LocalDeployment

    round_log, stats = root / "rounds.jsonl", root / "worker-stats.jsonl"
    os.environ["FEDMERGE_ROUND_LOG"] = str(round_log)
    os.environ["FEDMERGE_WORKER_STATS"] = str(stats)
    names = [f"hospital-{i}" for i in range(len(site_files))]
    with LocalDeployment(root / "deploy", app_dir=ROOT) as dep:
        dep.make_certs(names)
        dep.start_superlink()
        dep.register(*names)
        for name, site, data in zip(names, site_names, site_files, strict=True):
            dep.start_node(name, {
                "site": site, "data": f"jsonl:{data}", "parent-a": str(parents[0]),
                "parent-b": str(parents[1]), **policy,
            })
        settle = wait_until_idle(dep)
        print(f"{len(names)} nodes connected and idle after {settle:.0f}s", flush=True)
        idle = measure_idle(dep, idle_window)
        print(f"idle: {idle}", flush=True)
        if idle_only:
            return idle
        out = root / "deploy-report"
        run_config = run_config_for(recipe, out, sites=len(names))
        staged = stage_app(ROOT, root / "staged", run_config, serverapp="timed_server_app:app",
                           extra_files=[Path(__file__).with_name("timed_server_app.py")])
        t0, submitted = time.monotonic(), time.time()
        run_id = dep.submit(run_config, app_dir=staged)
        dep.wait_for_file(out / "report.json", run_id, timeout=1800)
        total = time.monotonic() - t0
    events = [json.loads(x) for x in round_log.read_text().splitlines()]
    first_start = min(e["t"] for e in events if e["event"] == "round_start") - submitted
    tasks = [json.loads(x) for x in stats.read_text().splitlines()]
    first_task = {}  # per node: submit to claiming its first message (after idle polls)
    for rec in tasks:
        first_task[rec["address"]] = min(first_task.get(rec["address"], rec["started"]),
                                         rec["started"])
    spans = round_spans(events)
    scoring: dict[int, dict[str, float]] = {}
    for rec in tasks:
        if rec["message_type"].startswith("train") and rec["group_id"].isdigit():
            per_node = scoring.setdefault(int(rec["group_id"]), {})
            per_node[rec["address"]] = per_node.get(rec["address"], 0.0) + rec["handler_s"]
    fractions = [1 - max(scoring.get(r, {0: 0.0}).values()) / s for r, s in spans.items()]
    return {"spans": spans, "total_s": total, "fractions": fractions,
            "scoring": {r: max(v.values()) for r, v in scoring.items()},
            "first_round_start_s": first_start,
            "first_task_s": max(first_task.values()) - submitted, **idle}


def run_sim(root: Path, union: Path, parents, recipe_fields, overrides) -> dict:
    from simulation.runner import run_simulation

    events: list[dict] = []

    def on_event(kind, **kw):
        if kind in ("round_start", "round_end"):
            events.append({"event": kind, "round": kw.get("round"), "t": time.time()})

    t0 = time.monotonic()
    run_simulation(data=f"jsonl:{union}", split="region", parents=parents,
                   method=recipe_fields["method"], search="grid", out=root / "sim-report",
                   recipe_fields=recipe_fields, node_overrides=overrides, on_event=on_event)
    return {"spans": round_spans(events), "total_s": time.monotonic() - t0}


def main() -> None:
    import signal

    # `timeout`/`kill` stop the benchmark through its context managers, which stop every
    # Flower process it started (Python's default SIGTERM would leave them running).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="30m")
    ap.add_argument("--stays", type=int, default=150, help="stays per site")
    ap.add_argument("--grid-points", type=int, default=11)
    ap.add_argument("--nodes", type=int, default=3, help="hospitals (one synthetic site each)")
    ap.add_argument("--idle-window", type=float, default=30.0,
                    help="seconds of idle CPU sampling before the run")
    ap.add_argument("--idle-only", action="store_true",
                    help="start the nodes, measure their idle cost, stop (no run)")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulation run")
    args = ap.parse_args()

    from server.recipe import validate_recipe

    root = Path(tempfile.mkdtemp(prefix="fedmerge-deploy-bench-"))
    stays = "/".join([str(args.stays)] * args.nodes)
    union, files, names, texts = write_sites(
        root, f"synthetic:sites={args.nodes},stays={stays},seed=11")
    parents = build_parents(root, texts, args.model)
    print(f"parents: {parents[2] / 1e6:.1f}M parameters; {args.nodes} sites of {args.stays} "
          f"stays; grid {args.grid_points}", flush=True)
    recipe_fields = {"method": "linear",
                     "search": {"strategy": "grid", "grid_points": args.grid_points},
                     "secagg": {"timeout": 900.0}}
    recipe = validate_recipe({**recipe_fields, "parent_a": str(parents[0]),
                              "parent_b": str(parents[1])})
    # One scoring thread per node in both engines: Ray gives each simulated node one CPU, and
    # three deployed nodes on one host would otherwise oversubscribe its cores.
    policy = {"min-cohort": 5, "min-positives": 1, "threads": 1}
    if args.idle_only:
        idle = run_deploy(root, parents[:2], files, names, recipe, policy,
                          idle_window=args.idle_window, idle_only=True)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                          for k, v in idle.items()}))
        return
    sim = None
    if not args.no_sim:
        sim = run_sim(root, union, parents[:2], recipe_fields,
                      {i: policy for i in range(args.nodes)})
        print(f"simulation: rounds {sim['spans']} total {sim['total_s']:.1f}s", flush=True)
    dep = run_deploy(root, parents[:2], files, names, recipe, policy,
                     idle_window=args.idle_window)
    print(f"deployment: rounds {dep['spans']} scoring {dep['scoring']} "
          f"total {dep['total_s']:.1f}s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(json.dumps({
        "model": args.model,
        "parameters": parents[2],
        "stays_per_site": args.stays,
        "rounds": len(dep["spans"]),
        "deploy_round_s": round(mean(list(dep["spans"].values())), 3),
        "sim_round_s": round(mean(list(sim["spans"].values())), 3) if sim else None,
        "outside_scoring_fraction": round(mean(dep["fractions"]), 3),
        "deploy_total_s": round(dep["total_s"], 1),
        "sim_total_s": round(sim["total_s"], 1) if sim else None,
        "first_round_start_s": round(dep["first_round_start_s"], 2),
        "first_task_s": round(dep["first_task_s"], 2),
        "idle_nodes": dep["idle_nodes"],
        "idle_node_cpu": round(dep["idle_node_cpu"], 4),
        "idle_node_cpu_max": round(dep["idle_node_cpu_max"], 4),
        "idle_link_cpu": round(dep["idle_link_cpu"], 4),
    }))


if __name__ == "__main__":
    main()

"""What a deployed run is doing, and why it failed: `progress.json` and a failure report.

Why: a deployed ServerApp runs next to the SuperLink, detached from the operator who
submitted it; its only outputs used to be the report of a run that succeeded and a line in
`flwr list`. `RunTracker` follows the coordinator's events (`run_tuning`'s `on_event`) and
keeps `OUT/progress.json` current (stage, rounds done, sites, elapsed), which
`fedmerge coordinator submit` shows while it waits; when the run fails it writes
`OUT/report.json` anyway, naming the stage, the cause, the refusal codes, the sites that
answered and the sites missing, by name. Only names, codes and counts: no site sends more.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.atomic_files import write_atomic

PROGRESS_NAME = "progress.json"
REPORT_NAME = "report.json"


def write_json(path: Path, payload: dict, *, durable: bool = True) -> None:
    """Atomically: a reader never sees half a file."""
    write_atomic(path, json.dumps(payload, indent=2) + "\n", durable=durable)


class RunTracker:
    """The coordinator's `on_event`: keeps `progress.json` and knows the failure's context."""

    def __init__(self, out: Path, run_id: int, grid=None, expected_sites: int | None = None):
        self.out = Path(out)
        self.grid = grid
        self.started = time.time()
        self.state: dict = {
            "run_id": run_id, "status": "running", "stage": "waiting for sites",
            "expected_sites": expected_sites, "connected": None, "accepted": [],
            "refusals": [], "dropouts": [], "round": None, "rounds_done": 0,
            "scoring": {}, "elapsed_s": 0.0,
        }
        self.nodes: dict[int, str] = {}
        self._stage_start = 0
        self._write()

    def _write(self) -> None:
        self.state["elapsed_s"] = round(time.time() - self.started, 1)
        # Rewritten at every site's progress tick: whole for readers, no fsync each time.
        write_json(self.out / PROGRESS_NAME, self.state, durable=False)

    def _mark_stage(self, stage: str) -> None:
        self.state["stage"] = stage
        self._stage_start = len(self.grid.received) if self.grid is not None else 0

    def __call__(self, kind: str, **info) -> None:
        st = self.state
        if kind == "nodes":
            st["connected"] = info["count"]
            self._mark_stage("announcement")
        elif kind == "announced":
            self.nodes = dict(info.get("nodes") or {})
            st["accepted"] = list(info["accepted"])
            st["refusals"] = list(info["refusals"])
        elif kind == "round_start":
            st["round"] = info["round"]
            st["scoring"] = {}
            self._mark_stage(f"round {info['round']} ({info['stage']}): scoring")
        elif kind == "score_progress":
            st["scoring"][info["site"]] = f"{info['done']}/{info['total']}"
        elif kind == "secagg_start":
            self._mark_stage(f"round {info['round']} ({info['stage']}): secure aggregation")
        elif kind == "round_end":
            st["rounds_done"] += 1
        elif kind == "secagg_failed":
            st["missing_now"] = list(info["missing"])
        elif kind == "site_lost":
            st["refusals"] = list(info["refusals"])
            st["dropouts"] = list(info["dropouts"])
        else:
            return
        self._write()

    def _answered_in_stage(self) -> set[str]:
        if self.grid is None:
            return set()
        return {
            self.nodes[m.metadata.src_node_id]
            for m in self.grid.received[self._stage_start:]
            if not m.has_error() and m.metadata.src_node_id in self.nodes
        }

    def failure(self, message: str, cause: str = "error") -> dict:
        """report.json of a failed run, and progress.json marked failed. `cause`: the code
        the run stopped with (`common.errors.RunStopped.cause`), else "error"."""
        st = self.state
        lost = {r["site"] for r in st["refusals"]} | {d["site"] for d in st["dropouts"]}
        if st["stage"] == "announcement":
            answered = set(st["accepted"])
        else:
            answered = self._answered_in_stage() or (set(st["accepted"]) - lost)
        missing = (set(st["accepted"]) - answered) | lost | set(st.get("missing_now", []))
        answered -= missing
        st["status"] = "failed"
        self._write()
        return {
            "status": "failed",
            "run_id": st["run_id"],
            "stage": st["stage"],
            "cause": cause,
            "message": message,
            "rules": {r["site"]: r["reason"] for r in st["refusals"]},
            "expected_sites": st["expected_sites"],
            "connected_sites": st["connected"],
            "accepted_sites": st["accepted"],
            "sites_answered": sorted(answered),
            "sites_missing": sorted(missing),
            "refusals": st["refusals"],
            "dropouts": st["dropouts"],
            "rounds_done": st["rounds_done"],
            "elapsed_s": st["elapsed_s"],
        }

    def finished(self) -> None:
        self.state["status"] = "finished"
        self.state["stage"] = "report written"
        self._write()


def write_failure_report(out: Path, report: dict) -> Path:
    path = Path(out) / REPORT_NAME
    write_json(path, report)
    return path

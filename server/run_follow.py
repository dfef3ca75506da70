"""`fedmerge coordinator submit`: upload a run, then follow it until its report is written.

Why: `flwr run` returns once the app is uploaded; what happened next was visible only in
`flwr list`, and a failed run left no report. Here the command waits by default, printing
one line whenever the run's progress changes (stage, rounds, sites, elapsed, read from the
`progress.json` the ServerApp keeps, `server/run_progress.py`), and ends with the report's
outcome. `--detach` returns at once; either way the lines say how to follow and how to stop
the run, and Ctrl-C while waiting leaves the run running (and says so). A run stopped with
`flwr stop` writes nothing itself, so the waiting command writes its report.json.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import FedmergeError
from common.flower_runtime import flower_exe
from server.run_progress import PROGRESS_NAME, REPORT_NAME, write_failure_report

STATUS_EVERY_S = 10.0


def upload(argv: list[str], env: dict[str, str]) -> int:
    """Run `flwr run ... --format json`; the run id, or one line saying why not."""
    try:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise FedmergeError(f"{argv[0]}: not found on PATH (install fedmerge's environment)")\
            from None
    try:
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        return int(payload["run-id"])
    except (ValueError, KeyError):
        detail = " ".join((res.stdout + res.stderr).split())[-400:]
        raise FedmergeError(f"flwr run failed (exit {res.returncode}): {detail}") from None


def how_to(run_id: int, connection: str, out: Path) -> list[str]:
    return [
        f"follow it:  flwr log {run_id} {connection}   (or: flwr list {connection})",
        f"stop it:    flwr stop {run_id} {connection}",
        f"report:     {out / REPORT_NAME} (written when the run ends, failed runs included)",
    ]


def run_status(run_id: int, connection: str, env: dict[str, str]) -> str:
    """Flower's status of the run ("running", "finished:completed", ...), or "unknown"."""
    res = subprocess.run(
        [flower_exe("flwr"), "list", connection, "--run-id", str(run_id), "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    try:
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        return str(payload["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return "unknown"


def progress_line(p: dict) -> str:
    sites = f"{len(p['accepted'])} sites accepted" if p["accepted"] else (
        f"{p['connected']} sites connected" if p["connected"] is not None else "waiting for sites"
    )
    scoring = ", ".join(f"{s} {d}" for s, d in sorted(p.get("scoring", {}).items()))
    lost = len(p["refusals"]) + len(p["dropouts"])
    return (
        f"[{_clock(p['elapsed_s'])}] {p['stage']}; {sites}"
        + (f", {lost} refused or dropped" if lost else "")
        + f"; {p['rounds_done']} round(s) done"
        + (f"; scored: {scoring}" if scoring and "scoring" in p["stage"] else "")
    )


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def outcome_lines(report: dict) -> tuple[int, list[str]]:
    """(exit code, lines) for a report.json."""
    status = report.get("status", "completed")
    if status == "completed":
        sites = ", ".join(report.get("contributing_sites", []))
        test = report.get("test", {}).get("lambda_star", {})
        auroc = test.get("auroc")
        return 0, [
            f"completed: λ* = {report['lambda_star']}, held-out AUROC "
            f"{'—' if auroc is None else f'{auroc:.4f}'}, sites {sites}"
        ]
    lines = [f"{status} at {report['stage']}: {report['cause']} — {report['message']}"]
    for site, rule in sorted(report.get("rules", {}).items()):
        lines.append(f"  refused by {site}: {rule}")
    if report.get("sites_answered"):
        lines.append(f"  sites that answered: {', '.join(report['sites_answered'])}")
    if report.get("sites_missing"):
        lines.append(f"  sites missing: {', '.join(report['sites_missing'])}")
    return 1, lines


def wait_for_report(
    run_id: int, connection: str, out: Path, env: dict[str, str],
    echo: Callable[[str], None], *, since: float, poll_s: float = 1.0,
) -> int:
    """Print progress until the run's report.json appears (exit code from its outcome)."""
    report_path, progress_path = out / REPORT_NAME, out / PROGRESS_NAME
    shown = None
    started = time.monotonic()
    next_status = started + STATUS_EVERY_S
    while True:
        if _newer(report_path, since):
            report = json.loads(report_path.read_text(encoding="utf-8"))
            code, lines = outcome_lines(report)
            for line in lines:
                echo(line)
            echo(f"report: {report_path}")
            return code
        if _newer(progress_path, since):
            try:
                progress = json.loads(progress_path.read_text(encoding="utf-8"))
            except ValueError:
                progress = None
            if progress and progress.get("run_id") == run_id:
                line = progress_line(progress)
                if line.partition("] ")[2] != (shown or "").partition("] ")[2]:
                    echo(line)
                    shown = line
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + STATUS_EVERY_S
            status = run_status(run_id, connection, env)
            if status.startswith("finished"):
                time.sleep(2.0)  # the ServerApp's last write
                if _newer(report_path, since):
                    continue
                ended = status.partition(":")[2] or "finished"
                write_failure_report(out, {
                    # Never "completed": a report without results is not a completed run.
                    "status": "no-report" if ended == "completed" else ended, "run_id": run_id,
                    "stage": _last_stage(progress_path, since), "cause": f"flower:{status}",
                    "message": f"the run ended as {status} without writing a report "
                    "(stopped with flwr stop, or the ServerApp died)",
                })
                continue
        time.sleep(poll_s)


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _last_stage(progress_path: Path, since: float) -> str:
    if not _newer(progress_path, since):
        return "before the first round"
    try:
        return str(json.loads(progress_path.read_text(encoding="utf-8"))["stage"])
    except (ValueError, KeyError, OSError):
        return "unknown"

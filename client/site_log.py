"""The site's own log: one structured line per run and round, codes and numbers only.

Why: a hospital's operator must be able to say which runs the node took part in, which it
refused and by which of its rules, and that each finished, months later, without reading
Flower's log. Each line is `TIME event=E run=R key=value ...`; every value must match
`SAFE_VALUE` (numbers, refusal codes, truncated fingerprints), so no path, record id,
exception text or patient text can reach this file whatever a caller passes. The worker
writes it (`--site-log`) through a RotatingFileHandler; `fedmerge node status` reads it.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from pydantic import BaseModel

SITE_LOGGER = "fedmerge.site"
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:,+-]{1,80}$")
FINGERPRINT_CHARS = 12

log = logging.getLogger(SITE_LOGGER)


def _value(v: object) -> str:
    text = str(v)
    return text if SAFE_VALUE.match(text) else "?"


def site_event(event: str, **fields: object) -> None:
    """Write one structured line (values that are not plain codes or numbers become "?")."""
    parts = [f"event={_value(event)}"]
    parts += [f"{k}={_value(v)}" for k, v in fields.items() if v is not None]
    log.info(" ".join(parts))


def fingerprints(pair: tuple[str, str]) -> str:
    return ",".join(fp[:FINGERPRINT_CHARS] for fp in pair)


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime


def configure(path: Path, *, max_bytes: int, backups: int) -> None:
    """Send the site's lines to `path` only (plain text, UTC, rotated)."""
    from common.service import log_to_rotating_file

    log_to_rotating_file(log, path, _UTCFormatter("%(asctime)s %(message)s",
                                                  "%Y-%m-%dT%H:%M:%SZ"),
                         max_bytes=max_bytes, backups=backups)


def parse_line(line: str) -> dict[str, str] | None:
    """`TIME event=E k=v ...` -> {"time": TIME, "event": E, k: v}; None for other lines."""
    head, _, rest = line.strip().partition(" ")
    fields = dict(p.split("=", 1) for p in rest.split() if "=" in p)
    if "event" not in fields:
        return None
    return {"time": head, **fields}


class RunSummary(BaseModel):
    """What the site's log says about one run."""

    run: str
    outcome: str  # accepted | refused | failed | finished
    rule: str | None = None  # the refusal or failure code
    rounds: int = 0  # rounds released
    first: str
    last: str


def last_runs(path: Path, limit: int = 5) -> list[RunSummary]:
    """The last `limit` runs in the site log (and its newest rotated file), newest last."""
    lines: list[str] = []
    for p in (path.with_name(path.name + ".1"), path):
        if p.is_file():
            lines += p.read_text(encoding="utf-8", errors="replace").splitlines()
    runs: dict[str, RunSummary] = {}
    for line in lines:
        rec = parse_line(line)
        if rec is None or "run" not in rec:
            continue
        run = runs.get(rec["run"])
        if run is None:
            run = runs[rec["run"]] = RunSummary(
                run=rec["run"], outcome="accepted", first=rec["time"], last=rec["time"]
            )
        run.last = rec["time"]
        event = rec["event"]
        if event in ("refused", "failed"):
            run.outcome, run.rule = event, rec.get("rule")
        elif event == "released":
            run.rounds += 1
        elif event == "finished":
            run.outcome = "finished"
    return list(runs.values())[-limit:]

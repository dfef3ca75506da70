"""The coordinator's ServerApp with round timestamps, for `bench/deploy_round.py` only.

Why a separate app: the report says which rounds ran, not how long they took, and in a
deployment the ServerApp runs in a `flwr-serverapp` process the benchmark cannot hook.
This app is the same `make_server_app` with an `on_event` that appends one JSON line per
round start/end to the file named by `$FEDMERGE_ROUND_LOG` (inherited from the SuperLink's
environment). Operators never need it; the benchmark ships it in the staged app bundle
(`stage_app(..., extra_files=[this file], serverapp="timed_server_app:app")`).
"""

from __future__ import annotations

import json
import os
import time

from server.server_app import make_server_app


def log_event(kind: str, **fields) -> None:
    path = os.environ.get("FEDMERGE_ROUND_LOG")
    if not path or kind not in ("round_start", "round_end"):
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": kind, "round": fields.get("round"), "t": time.time()}))
        fh.write("\n")


app = make_server_app(on_event=log_event)

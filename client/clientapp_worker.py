"""A long-lived ClientApp executor for a SuperNode started with `--isolation process`.

Why this exists: with Flower 1.41's default `--isolation subprocess`, the SuperNode's
SuperExec starts a fresh `flwr-clientapp` process for every message (measured: a new pid and
an empty module cache on every message, ~2 s of process start-up and imports each time), so
a hospital would reload both parents and re-tokenize its cohort for every round. With
`--isolation process` the SuperNode starts no executor and waits for one; this worker is
that executor. It claims each ClientApp task from the SuperNode's Runtime API and runs it in
THIS process, so module-level caches (loaded parents, tokenized records) live as long as
the worker, across messages, rounds and runs.

Trust: by default (`app_source="installed"`) the worker runs the ClientApp of the fedmerge
package installed on this machine and refuses runs of any other app, so the code a
hospital executes is the code it installed and reviewed, not code shipped through the
SuperLink's Control API. `app_source="fab"` runs the shipped app instead (Flower's own
behaviour), still loaded once per app hash.

It drives Flower's Runtime API with the client-side helpers from the installed flwr
(`flwr.supernode.runtime.run_clientapp`), which are internal: it refuses any Flower release
but the one pinned in `common.flower_runtime`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from common.errors import FedmergeError
from common.flower_runtime import check_flwr_version

INSTALLED_APP_REF = "client.client_app:app"
FEDMERGE_FAB_ID = "fedmerge/fedmerge"

log = logging.getLogger("fedmerge.worker")

# The worker asks the SuperNode for a task every ACTIVE_POLL_S seconds for ACTIVE_WINDOW_S
# seconds after its last task (a SecAgg+ round's stages follow each other closely), then the
# wait grows by half per empty poll up to IDLE_POLL_S. A node idles for months between runs:
# polling every 0.05 s (and the SuperNode every 0.25 s) cost it ~9% of a core, the adaptive
# polls ~0.5% (bench/deploy_round.py --idle-only, docs/operators.md "Idle cost").
ACTIVE_POLL_S = 0.05
IDLE_POLL_S = 2.0
ACTIVE_WINDOW_S = 60.0
BACKOFF = 1.5


def next_wait(wait: float, since_task: float, *, active: float, idle: float,
              window: float) -> float:
    """The wait after an empty poll, given the previous wait and the seconds since the last
    task: `active` inside the window, then growing by BACKOFF per poll up to `idle`."""
    if since_task < window:
        return active
    return min(idle, max(wait, active) * BACKOFF)


def task_heartbeat_fn(client) -> Callable[[], bool]:
    """The task heartbeat, without Flower's reaction to a refused one.

    Flower's own (`make_task_heartbeat_fn_http`) raises SIGINT in this process when the
    SuperNode answers a heartbeat with "not accepted" (in 1.41: the task is finished or its
    token is gone). In a worker that serves every run of the node, SIGINT means "stop the
    worker", which would leave the hospital with a SuperNode and no one to run its tasks.
    Here such an answer only ends that task's heartbeats; the worker serves on. (A heartbeat
    rejected with HTTP 401 goes through Flower's retry handler, which signals before this
    function sees it: `run_one` therefore stops the heartbeat before the task is closed.)
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # noqa: I001

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # retried by the sender
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            log.info("task heartbeat refused (HTTP %s): the task ended", err.response.status_code)
            return True
        if not res.success:
            log.info("task heartbeat refused: the run was stopped; the worker serves on")
        return True

    return beat


@dataclass
class TaskRecord:
    """What one claimed task cost (`started` is wall-clock time, the rest durations)."""

    run_id: int
    message_type: str
    group_id: str
    started: float
    pulled_s: float
    app_load_s: float
    handler_s: float
    pushed_s: float
    ok: bool
    detail: str = ""


@dataclass
class WorkerStats:
    tasks: list[TaskRecord] = field(default_factory=list)
    app_loads: int = 0


def _load_installed_app():
    import importlib

    module_name, _, attr = INSTALLED_APP_REF.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class ClientAppWorker:
    """Claims ClientApp tasks from one SuperNode and runs them in this process."""

    def __init__(
        self,
        runtime_api_address: str,
        *,
        app_source: Literal["installed", "fab"] = "installed",
        app_loader: Callable[[], object] | None = None,
        allowed_fab_ids: tuple[str, ...] = (FEDMERGE_FAB_ID,),
        poll_interval: float = ACTIVE_POLL_S,
        idle_poll_interval: float = IDLE_POLL_S,
        active_window: float = ACTIVE_WINDOW_S,
    ) -> None:
        check_flwr_version("the persistent ClientApp worker's Runtime API calls")
        if not 0 < poll_interval <= idle_poll_interval:
            raise ValueError(
                f"poll interval {poll_interval} s, idle {idle_poll_interval} s: "
                "expected 0 < active <= idle"
            )
        self.address = runtime_api_address
        self.app_source = app_source
        self.allowed_fab_ids = allowed_fab_ids
        self.poll_interval = poll_interval
        self.idle_poll_interval = idle_poll_interval
        self.active_window = active_window
        self._app_loader = app_loader or _load_installed_app
        self._apps: dict[str, object] = {}
        self.stats = WorkerStats()
        self.stop_event = threading.Event()
        self.stats_path = os.environ.get("FEDMERGE_WORKER_STATS") or None

    # -- Runtime API plumbing -------------------------------------------------------------
    def _client(self, token: str | None):
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [
            RuntimeVersionHttpInterceptor(
                component_name="flwr-clientapp" if token else "SuperExec"
            )
        ]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        # The Runtime API listens on the hospital's loopback only, without TLS (as Flower's
        # own SuperExec connects to it in subprocess mode).
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _acquire(self, client) -> str | None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: I001
        from flwr.supercore.constant import TaskType

        res = client.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        )
        if res.HasField("task") and res.token:
            return res.token
        return None

    def _app_for(self, run, fab):
        """The ClientApp for this run, loaded once per app hash and then reused."""
        key = fab.hash_str if self.app_source == "fab" else INSTALLED_APP_REF
        if key in self._apps:
            return self._apps[key]
        if self.app_source == "fab":
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str
            )
        else:
            app = self._app_loader()
        self._apps[key] = app
        self.stats.app_loads += 1
        return app

    def run_one(self, token: str) -> TaskRecord:
        """Pull one message, run the ClientApp on it, push the reply (or an error reply)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        t0 = time.perf_counter()
        client = self._client(token)
        heartbeat = HeartbeatSender(task_heartbeat_fn(client))
        heartbeat.start()
        message = context = reply = None
        run_id, mtype, group, detail = 0, "", "", ""
        status = SubStatus.FAILED
        t_pull = t_load = t_handler = t_push = t0
        try:
            message, context, run, fab = pull_task_input(client)
            run_id, mtype = run.run_id, message.metadata.message_type
            group = message.metadata.group_id
            t_pull = time.perf_counter()
            if self.app_source == "installed" and run.fab_id not in self.allowed_fab_ids:
                raise FedmergeError(
                    f"run {run.run_id}: app {run.fab_id!r} is not the installed fedmerge "
                    f"app ({', '.join(self.allowed_fab_ids)}); this node refuses it"
                )
            app = self._app_for(run, fab)
            t_load = time.perf_counter()
            reply = app(message=message, context=context)
            t_handler = time.perf_counter()
            status = SubStatus.COMPLETED
        except Exception as exc:  # the reply carries the error; the worker keeps serving
            log.exception("ClientApp task failed")
            detail = f"{type(exc).__name__}: {exc}"
            t_load = max(t_load, t_pull)
            t_handler = time.perf_counter()
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=detail),
                    reply_to=message,
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                # Stop the heartbeat while the task token is still valid: a heartbeat sent
                # after push_task_output gets 401, on which Flower's HTTP retry sends SIGINT
                # to its own process, i.e. it stopped this worker and the node hung (seen in
                # bench/deploy_round.py on a busy machine: a quick task finished before the
                # heartbeat thread's first request).
                if heartbeat.is_running:
                    heartbeat.stop()
                push_task_output(client, context, status, detail)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                client.close()
            t_push = time.perf_counter()
        rec = TaskRecord(
            run_id=run_id, message_type=mtype, group_id=group,
            started=time.time() - (t_push - t0), pulled_s=t_pull - t0,
            app_load_s=t_load - t_pull, handler_s=t_handler - t_load,
            pushed_s=t_push - t_handler, ok=status == SubStatus.COMPLETED, detail=detail,
        )
        self.stats.tasks.append(rec)
        if self.stats_path is not None:  # for bench/deploy_round.py
            import dataclasses
            import json

            with open(self.stats_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({
                    "address": self.address, "pid": os.getpid(), **dataclasses.asdict(rec)
                }) + "\n")
        return rec

    def warm_up(self) -> None:
        """Import the app and the heavy libraries before the first message, not during it.

        The first scoring round otherwise pays torch/transformers imports (measured 10+ s on
        a busy 2-core machine) inside the coordinator's SecAgg+ timeout.
        """
        import importlib

        if self.app_source == "installed":
            self._apps.setdefault(INSTALLED_APP_REF, self._app_loader())
        for name in ("torch", "transformers", "common.merge.switch", "common.scoring"):
            try:
                importlib.import_module(name)
            except ImportError:  # optional: the app imports what it needs anyway
                log.warning("warm-up: could not import %s", name)

    def serve(self, max_tasks: int | None = None) -> WorkerStats:
        """Poll the SuperNode until `stop_event` is set (or `max_tasks` have run)."""
        poller = self._client(None)
        # A fresh worker starts idle: its first task may wait up to idle_poll_interval.
        last_task, wait = -float("inf"), self.idle_poll_interval
        try:
            while not self.stop_event.is_set():
                token = self._acquire(poller)
                if token is None:
                    wait = next_wait(
                        wait, time.monotonic() - last_task, active=self.poll_interval,
                        idle=self.idle_poll_interval, window=self.active_window,
                    )
                    self.stop_event.wait(wait)
                    continue
                try:
                    rec = self.run_one(token)
                except Exception:  # e.g. the SuperNode went away mid-push: keep serving
                    log.exception("task with token %s... could not be completed", token[:6])
                    continue
                finally:
                    last_task = time.monotonic()
                log.info(
                    "task %s run %s: handler %.3fs, io %.3fs",
                    rec.message_type, rec.run_id, rec.handler_s,
                    rec.pulled_s + rec.pushed_s,
                )
                if max_tasks is not None and len(self.stats.tasks) >= max_tasks:
                    break
        finally:
            poller.close()
        return self.stats


def main(argv: list[str] | None = None) -> None:
    """`python -m client.clientapp_worker --runtime-api-address 127.0.0.1:9094 [--app-source]`."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--app-source", choices=("installed", "fab"), default="installed")
    parser.add_argument("--poll-interval", type=float, default=ACTIVE_POLL_S,
                        help="seconds between polls while tasks arrive")
    parser.add_argument("--idle-poll-interval", type=float, default=IDLE_POLL_S,
                        help="seconds between polls once idle")
    parser.add_argument("--active-window", type=float, default=ACTIVE_WINDOW_S,
                        help="seconds after a task before backing off")
    parser.add_argument("--site-log", default=None,
                        help="the site's structured log (client/site_log.py), rotated")
    parser.add_argument("--log-max-bytes", type=int, default=10_000_000)
    parser.add_argument("--log-backups", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    if args.site_log:
        from pathlib import Path

        from client.site_log import configure

        configure(Path(args.site_log), max_bytes=args.log_max_bytes, backups=args.log_backups)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    worker = ClientAppWorker(
        args.runtime_api_address, app_source=args.app_source, poll_interval=args.poll_interval,
        idle_poll_interval=args.idle_poll_interval, active_window=args.active_window,
    )
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: worker.stop_event.set())
    worker.warm_up()
    log.info("ready: serving the SuperNode at %s", args.runtime_api_address)
    worker.serve()


if __name__ == "__main__":
    main()

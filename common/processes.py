"""Start Flower processes so that they can always be stopped, children included.

Why process groups: `flower-superlink` spawns `flower-superexec`, which spawns
`flwr-serverapp`; `flower-supernode` may spawn `flwr-clientapp`s. Killing only the pid we
started leaves those running (and holding ports). Each command therefore starts in its own
session, and stopping signals the whole group: SIGTERM, a grace period, then SIGKILL.
Flower 1.41's `flower-superlink` starts `flower-superexec` in a session of ITS own (out of
reach of the group's signals; it stops it on SIGTERM, waiting 1 s), so `stop_all` also waits
for, and if need be kills, every process that was running under the ones it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class Proc:
    """One started command, its log file, and how to stop its whole process group."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path,
                 cwd: Path | None = None, on_line: Callable[[str], None] | None = None) -> None:
        """With `on_line`, the output is piped to it line by line (which then owns writing
        `log_path`, e.g. rotated and without colour codes) instead of going to the file."""
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = None if on_line else open(self.log_path, "ab")  # noqa: SIM115 - stop()
        self.popen = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE if on_line else self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._pump = None
        if on_line is not None:
            self._pump = threading.Thread(
                target=_pump_lines, args=(self.popen.stdout, on_line), daemon=True,
                name=f"{name}-output",
            )
            self._pump.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, wait `grace` seconds, then SIGKILL whatever is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)
        # The leader may be gone while its children linger in the group: kill the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)
        if self._pump is not None:
            self._pump.join(timeout=grace)
        if self._log is not None:
            self._log.close()


def _pump_lines(stream, on_line: Callable[[str], None]) -> None:
    """Hand every output line to `on_line` until the process (group) closes its output."""
    with stream:
        for raw in iter(stream.readline, b""):
            with contextlib.suppress(Exception):  # a sink error must not block the child
                on_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))


class ProcSet:
    """Processes started together and stopped together (reverse order), also on error."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], **kw) -> Proc:
        proc = Proc(name, argv, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every group at once, one shared grace period, then SIGKILL the rest;
        returns once every process that ran under them is gone, whatever its group."""
        procs, self.procs = self.procs[::-1], []
        strays = _descendants([p.pid for p in procs])
        for p in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.0, deadline - time.monotonic()))
        for p in procs:
            p.stop(grace=1.0)  # SIGKILLs whatever of the group is left, closes the log
        _reap(strays, grace)

    def __enter__(self) -> ProcSet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _descendants(pids: list[int]) -> list:
    """The processes running under `pids` now (psutil objects: they know a reused pid)."""
    import psutil

    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.extend(psutil.Process(pid).children(recursive=True))
    return found


def _reap(procs: list, grace: float) -> None:
    """Wait up to `grace` seconds for `procs` to exit (their parents were asked to stop
    them), SIGKILL whatever is left and wait for that too. A zombie counts as gone."""
    import psutil

    def running(proc) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    for kill in (False, True):
        alive = [p for p in procs if running(p)]
        for proc in alive if kill else ():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if running(p)]
        procs = alive


@contextlib.contextmanager
def proc_set() -> Iterator[ProcSet]:
    procs = ProcSet()
    try:
        yield procs
    finally:
        procs.stop_all()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (racy by nature; callers retry on bind failure)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, *, timeout: float, proc: Proc | None = None) -> None:
    """Until something accepts TCP connections on host:port; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.poll()} before listening on {host}:{port}:\n"
                + proc.log_text()[-2000:]
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")

"""What a fedmerge command that runs for months needs: a PID file, stop signals, plain logs.

Why: `fedmerge node start` and `fedmerge coordinator start-superlink` each supervise Flower
processes that start processes of their own. systemd, docker and `kill` send SIGTERM (a
terminal closing sends SIGHUP); Python's default for both is to die at once, leaving every
child running (a "stopped" hospital kept taking part in runs). Here the three stop signals
become one exception in the supervising loop, whose `finally` stops every process group and
removes the PID file. The PID file (`pid` of the supervisor) is what `... stop` signals and
what refuses a second start from the same folder. Child output is written through
`RotatingFileHandler`s, without terminal colour codes.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common.atomic_files import write_atomic
from common.errors import FedmergeError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """A stop signal arrived; the supervising loop unwinds and stops its children."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM, SIGINT and SIGHUP raise StopRequested (main thread only)."""

    stopping = []

    def handler(signum, _frame):
        if not stopping:  # a second signal must not interrupt the stopping itself
            stopping.append(signum)
            raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def plain(line: str) -> str:
    """The line without terminal colour codes."""
    return ANSI_ESCAPE.sub("", line)


def log_to_rotating_file(logger: logging.Logger, path: Path, formatter: logging.Formatter, *,
                         max_bytes: int, backups: int) -> None:
    """Make `path` the logger's only destination: plain text, rotated at `max_bytes` with
    `backups` old files, never passed up to the root logger (so never to the terminal)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )
    handler.setFormatter(formatter)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def rotating_writer(path: Path, *, max_bytes: int, backups: int) -> Callable[[str], None]:
    """A line sink writing `path` as plain text, rotated at `max_bytes` with `backups` files."""
    logger = logging.getLogger(f"fedmerge.output.{path.resolve()}")
    log_to_rotating_file(logger, path, logging.Formatter("%(message)s"), max_bytes=max_bytes,
                         backups=backups)

    def write(line: str) -> None:
        logger.info(plain(line))

    return write


def process_running(pid: int, started: float | None = None) -> bool:
    """Whether `pid` runs; with `started` (its start as written in the PID file), also
    whether it is still the same process: after a reboot or a long time the kernel reuses
    pids, and a stale file must neither block a start nor make `stop` signal a stranger."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(_started_after_boot(proc) - started) < 0.05
    except psutil.Error:
        return False


def _started_after_boot(proc) -> float:
    """Seconds from boot to the process's start. Not its wall-clock start time: psutil
    derives that from the current boot time, which moves when the clock is stepped (NTP after
    boot, a VM resumed), while the kernel's tick count since boot does not."""
    import psutil

    return proc.create_time() - psutil.boot_time()


def _create_time(pid: int) -> float:
    import psutil

    return _started_after_boot(psutil.Process(pid))


class PidFile:
    """`path` holds the supervisor's pid while it runs; a stale file (its process gone) is
    replaced, a live one refuses the second start."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def pid(self) -> int | None:
        """The pid written there if that very process still runs, else None."""
        found = self.process()
        return None if found is None else found[0]

    def process(self) -> tuple[int, float | None] | None:
        """(pid, create time) written there if that very process still runs, else None. The
        file holds the pid and the process's create time (a file with a pid alone, as written
        before, is judged by the pid)."""
        try:
            fields = self.path.read_text().split()
            pid = int(fields[0])
            started = float(fields[1]) if len(fields) > 1 else None
        except (OSError, ValueError, IndexError):
            return None
        return (pid, started) if process_running(pid, started) else None

    def claim(self, what: str, stop_hint: str) -> None:
        running = self.pid()
        if running is not None and running != os.getpid():
            raise FedmergeError(
                f"{self.path}: {what} already runs from this folder (pid {running}); "
                f"stop it first with `{stop_hint}`"
            )
        me = os.getpid()
        write_atomic(self.path, f"{me} {_create_time(me):.3f}\n")

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(self.path.read_text().split()[0]) == os.getpid():
                self.path.unlink()


def stop_by_pid_file(pid_file: Path, *, what: str, timeout: float = 30.0) -> int | None:
    """SIGTERM the supervisor named in `pid_file` and wait until it (and so its children,
    which it stops before exiting) is gone; the pid stopped, or None if none was running."""
    found = PidFile(pid_file).process()
    if found is None:
        return None
    pid, started = found
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Judged by its create time too: once it exits, its pid may go to another process.
        if not process_running(pid, started):
            return pid
        time.sleep(0.1)
    raise FedmergeError(
        f"{pid_file}: {what} (pid {pid}) still runs {timeout:g} s after SIGTERM; "
        f"expected it to stop (kill -KILL {pid} as a last resort)"
    )

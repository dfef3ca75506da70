"""Plain progress lines on stderr for loads that take minutes (a full MIMIC-IV export).

One line when a step starts and one when it ends, with the seconds it took: readable in a
terminal, in a log file and in a CI transcript alike, and silent with FEDMERGE_QUIET=1.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = "FEDMERGE_QUIET"


def say(message: str) -> None:
    if os.environ.get(QUIET_ENV, "") not in {"1", "true", "yes"}:
        print(message, file=sys.stderr, flush=True)


@contextmanager
def step(source: str, what: str) -> Iterator[None]:
    """`source: what ...` before, `source: what done in N s` after."""
    say(f"{source}: {what} ...")
    start = time.perf_counter()
    yield
    say(f"{source}: {what} done in {time.perf_counter() - start:.1f} s")

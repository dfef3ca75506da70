"""`flower-supernode` with an adaptive poll: fast while a run is active, slow when idle.

flwr 1.41's SuperNode sleeps a hard-coded 3 s whenever its pull from the SuperLink finds no
message (`flwr.supernode.start_client_internal`). A SecAgg+ round is four message exchanges,
so every round waited about 6 s on average for nothing (bench/deploy_round.py). Polling fast
all the time fixes that but costs an idle hospital node ~10% of a core, and the SuperLink
~2% of a core per node, for months of idleness.

So this entry point replaces the `time` module inside that one Flower module with
`AdaptivePoll`, notes when a message is pulled or a reply pushed, and then runs Flower's
`flower_supernode()` unchanged (every other flag, TLS, node authentication and the Fleet
protocol are Flower's):

- within `--active-window` seconds of the last message or reply, the idle wait is
  `--active-poll` (0.25 s): the next SecAgg+ stage is picked up at once;
- after that the wait grows by half each empty pull up to `--idle-poll` (3 s, Flower's own
  value), so a node between runs costs what plain Flower costs and a run's first message
  waits at most `--idle-poll` seconds;
- while a message is being served, Flower's 0.5 s waits for the local reply are shortened
  to the active poll too.

The patch is checked against the pinned Flower version only.

    python -m client.supernode_poll --active-poll 0.25 --idle-poll 3 --active-window 60 \\
        <flower-supernode arguments>
"""

from __future__ import annotations

import functools
import math
import sys
import time as _time
from collections.abc import Callable

DEFAULT_ACTIVE_POLL_S = 0.25
DEFAULT_IDLE_POLL_S = 3.0
DEFAULT_ACTIVE_WINDOW_S = 60.0
# The sleep `start_client_internal`'s main loop requests after an empty pull; its other
# sleeps (0.5 s) wait for the local ClientApp's reply while a message is being served.
FLOWER_IDLE_SLEEP_S = 3
BACKOFF = 1.5  # growth of the wait per empty pull once the active window has passed


class AdaptivePoll:
    """Stands in for the `time` module inside start_client_internal only.

    A freshly started node is idle (its first wait is `idle_s`): nothing is running yet.
    """

    def __init__(
        self,
        active_s: float = DEFAULT_ACTIVE_POLL_S,
        idle_s: float = DEFAULT_IDLE_POLL_S,
        window_s: float = DEFAULT_ACTIVE_WINDOW_S,
        *,
        clock: Callable[[], float] = _time.monotonic,
        sleeper: Callable[[float], None] = _time.sleep,
    ) -> None:
        if not 0 < active_s <= idle_s:
            raise ValueError(
                f"--active-poll {active_s}, --idle-poll {idle_s}: expected 0 < active <= idle"
            )
        if window_s < 0:
            raise ValueError(f"--active-window {window_s}: expected seconds >= 0")
        self.active_s, self.idle_s, self.window_s = active_s, idle_s, window_s
        self._clock, self._sleep = clock, sleeper
        self.last_activity = -math.inf
        self.wait_s = idle_s

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def note_activity(self) -> None:
        """A message arrived or a reply left: poll fast for the next `window_s` seconds."""
        self.last_activity = self._clock()
        self.wait_s = self.active_s

    def idle_wait(self) -> float:
        """Seconds to wait after an empty pull."""
        if self._clock() - self.last_activity >= self.window_s:
            self.wait_s = min(self.idle_s, self.wait_s * BACKOFF)
        return self.wait_s

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_SLEEP_S:
            self._sleep(self.idle_wait())
        else:  # a message is being served: its reply is awaited locally
            self._sleep(min(seconds, self.active_s))


def _noting(poll: AdaptivePoll, fn: Callable, *, only_if_result: bool) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        if result is not None or not only_if_result:
            poll.note_activity()
        return result

    return wrapper


def install(
    active_s: float = DEFAULT_ACTIVE_POLL_S,
    idle_s: float = DEFAULT_IDLE_POLL_S,
    window_s: float = DEFAULT_ACTIVE_WINDOW_S,
) -> AdaptivePoll:
    """Make the SuperNode loop's sleeps adaptive; refuses a Flower release it was not checked
    against (the loop's structure and its 3 s sleep are Flower internals)."""
    from common.flower_runtime import check_flwr_version

    check_flwr_version("the SuperNode poll patch")
    poll = AdaptivePoll(active_s, idle_s, window_s)
    from flwr.supernode import start_client_internal as sci

    sci.time = poll
    # The main loop looks both up as module globals on every iteration. A pull returns the
    # run id when it stored a message, None when there was none.
    sci._pull_and_store_message = _noting(
        poll, sci._pull_and_store_message, only_if_result=True
    )
    sci._push_messages = _noting(poll, sci._push_messages, only_if_result=False)
    return poll


OPTIONS = {"--active-poll": "active_s", "--idle-poll": "idle_s", "--active-window": "window_s"}


def split_args(args: list[str]) -> tuple[dict[str, float], list[str]]:
    """This wrapper's leading options, and the rest for `flower-supernode`."""
    ours: dict[str, float] = {}
    while len(args) >= 2 and args[0] in OPTIONS:
        ours[OPTIONS[args[0]]], args = float(args[1]), args[2:]
    return ours, args


def main(argv: list[str] | None = None) -> None:
    ours, args = split_args(list(sys.argv[1:] if argv is None else argv))
    install(**ours)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()

"""`flower-supernode` with a shorter idle poll: Flower's own CLI, one sleep shortened.

flwr 1.41's SuperNode sleeps a hard-coded 3 s whenever its pull from the SuperLink finds no
message (`flwr.supernode.start_client_internal`). A SecAgg+ round is four message exchanges,
so every round waited about 6 s on average for nothing (bench/deploy_round.py). This entry
point caps that module's sleeps at `--idle-poll` seconds and then runs Flower's
`flower_supernode()` unchanged: every other flag, TLS, node authentication and the Fleet
protocol are Flower's. The patch is checked against the pinned Flower version only.

    python -m client.supernode_poll --idle-poll 0.25 <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time as _time

DEFAULT_IDLE_POLL_S = 0.25


class _CappedSleep:
    """Stands in for the `time` module inside start_client_internal only."""

    def __init__(self, cap_s: float):
        self.cap_s = cap_s

    def __getattr__(self, name: str):
        return getattr(_time, name)

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap_s))


def install(cap_s: float) -> None:
    """Cap the SuperNode loop's sleeps; refuses a Flower release it was not checked against."""
    from common.flower_runtime import check_flwr_version

    check_flwr_version("the SuperNode poll patch")
    if not 0 < cap_s <= 3:
        raise ValueError(f"--idle-poll {cap_s}: expected seconds in (0, 3]")
    from flwr.supernode import start_client_internal

    start_client_internal.time = _CappedSleep(cap_s)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cap = DEFAULT_IDLE_POLL_S
    if args[:1] == ["--idle-poll"] and len(args) >= 2:
        cap, args = float(args[1]), args[2:]
    install(cap)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()

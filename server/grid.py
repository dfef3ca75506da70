"""The coordinator's view of the Flower Grid: every message kept, replies pulled promptly.

Two jobs, one wrapper, because both sit on the same two calls (push and pull):
- it keeps every message sent and received, in order: the coordinator reads which sites
  answered a halted round from it, and the privacy tests prove from it that nothing
  per-site ever arrives in the clear;
- on a deployment it pulls replies every 0.1 s instead of flwr 1.41's 3 s, which a SecAgg+
  round would otherwise pay once per stage for nothing;
- while `message_ttl` is set it gives every message it sends that lifetime. Flower's
  SecAgg+ workflow sends its stages with the default 12 h lifetime and never cancels one
  that timed out, so a slow site would otherwise receive a stale stage long after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

# Between pulls for replies: a local request to the SuperLink, cheap against a stage's work.
PULL_INTERVAL_S = 0.1


class CoordinatorGrid(Grid):
    """Delegates to the real Grid, keeps every message, and pulls replies every 0.1 s."""

    def __init__(self, inner: Grid):
        self.inner = inner
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._lock = threading.Lock()
        self.message_ttl: float | None = None

    def _stamp(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if self.message_ttl is not None:
            for m in messages:
                m.metadata.ttl = self.message_ttl
        return messages

    def set_run(self, run) -> None:
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = self._stamp(messages)
        with self._lock:
            self.sent.extend(messages)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        got = list(self.inner.pull_messages(message_ids))
        with self._lock:
            self.received.extend(got)
        return got

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        """Flower's contract (push, then pull until every reply is in or `timeout` passes),
        polling every PULL_INTERVAL_S: the deployment grid of flwr 1.41 sleeps 3 s between
        pulls, which a SecAgg+ round pays once per stage for nothing. Other grids (the
        simulation's in-memory one polls every 0.1 s) keep their own loop."""
        from flwr.superlink.grid.http_grid import HttpGrid

        if not isinstance(self.inner, HttpGrid):
            messages = self._stamp(messages)
            with self._lock:
                self.sent.extend(messages)
            got = list(self.inner.send_and_receive(messages, timeout=timeout))
            with self._lock:
                self.received.extend(got)
            return got
        ids = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        got: list[Message] = []
        while ids:
            replies = list(self.pull_messages(ids))
            got.extend(replies)
            ids.difference_update(m.metadata.reply_to_message_id for m in replies)
            if not ids or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(PULL_INTERVAL_S)
        return got

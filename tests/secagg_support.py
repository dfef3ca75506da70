"""Test support for SecAgg+ rounds in one process: a loopback Grid to real ClientApps."""

from __future__ import annotations

import copy
import uuid

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from client.client_app import histogram_reply, read_instructions
from client.secagg_guard import GuardPolicy, checked_secaggplus_mod
from common.metrics import HistogramSpec
from common.protocol import RoundInstructions

BINS = 16
SITE_GUARD = checked_secaggplus_mod(lambda context: GuardPolicy(site="site", min_sites=3))


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages take their run and sender from TaskIdentity, as run_simulation sets it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield


class LoopbackGrid(Grid):
    """Delivers each message synchronously to `apps[node]` with that node's own Context."""

    def __init__(self, apps: dict[int, ClientApp], node_configs: dict[int, dict] | None = None,
                 tamper=None):
        self.apps = apps
        self.contexts = {
            nid: Context(
                run_id=1, node_id=nid, node_config=dict((node_configs or {}).get(nid, {})),
                state=RecordDict(), run_config={},
            )
            for nid in apps
        }
        self._replies: dict[str, Message] = {}
        # tamper(msg) -> msg: a malicious coordinator rewriting what it sends (or None).
        self.tamper = tamper

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        class _Run:
            run_id = 1

        return _Run()

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.apps)

    def deliver(self, msg: Message) -> Message:
        """One message to its node, synchronously; the node's reply."""
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        msg = copy.deepcopy(msg)  # a real transport serializes: no shared content objects
        if self.tamper is not None:
            msg = self.tamper(msg)
        nid = msg.metadata.dst_node_id
        try:
            reply = self.apps[nid](msg, self.contexts[nid])
        except Exception as exc:  # the runtime turns a raising ClientApp into an error reply
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = nid
        return reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            reply = self.deliver(msg)
            self._replies[reply.metadata.reply_to_message_id] = reply
            ids.append(reply.metadata.reply_to_message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return [self.deliver(msg) for msg in messages]


def fixed_instructions(candidates: int, rnd: int = 1) -> RoundInstructions:
    return RoundInstructions(
        round=rnd,
        stage="tune",
        recipe_fingerprint="r",
        parent_fingerprints=("a", "b"),
        method="linear",
        candidates=[i / max(candidates - 1, 1) for i in range(candidates)],
        fold=0,
        folds=2,
        histogram=HistogramSpec(bins=BINS, lo=-4, hi=4),
        sites=3,
    )


def fixed_site_app(hists, fail: bool = False, mod=SITE_GUARD) -> ClientApp:
    """A ClientApp whose train handler returns fixed histograms the real way, behind the
    site's SecAgg+ guard (as fedmerge's ClientApp registers it)."""
    app = ClientApp()

    @app.train(mods=[mod])
    def train(msg, context):
        assert read_instructions(msg).round >= 1
        if fail:
            raise RuntimeError("site dropped")
        return histogram_reply(msg, hists, BINS)

    return app


def random_hists(rng, candidates: int, high: int):
    return [
        (rng.integers(0, high, BINS, dtype=np.int64), rng.integers(0, high, BINS, dtype=np.int64))
        for _ in range(candidates)
    ]

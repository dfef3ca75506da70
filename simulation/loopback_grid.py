"""A Flower Grid inside one process: each message goes, serialized as on the wire, straight to
a real ClientApp with that node's own Context, and the reply comes back the same way.

Why: the SecAgg+ protocol, the site's guard and the coordinator's rounds can then be run,
attacked and timed without Ray or network processes: the adversarial tests swap in a
malicious coordinator (`tamper` rewrites what a node receives) and `bench/secagg_scale.py`
measures the protocol's own compute (`on_deliver` sees each handler's time and bytes).
Everything else is real: the messages pass through Flower's protobuf serialization, the apps
are the real ClientApps with their mods.
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Callable, Mapping

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid


def _over_the_wire(msg: Message) -> tuple[Message, int]:
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    data = message_to_proto(msg).SerializeToString()
    return message_from_proto(ProtoMessage.FromString(data)), len(data)


class LoopbackGrid(Grid):
    """Delivers each message synchronously to `apps[node]`; see the module docstring."""

    def __init__(
        self,
        apps: Mapping[int, ClientApp],
        node_configs: Mapping[int, Mapping[str, object]] | None = None,
        *,
        tamper: Callable[[Message], Message] | None = None,
        on_deliver: Callable[[Message, float, int], None] | None = None,
    ):
        self.apps = dict(apps)
        self.contexts = {
            nid: Context(
                run_id=1, node_id=nid, node_config=dict((node_configs or {}).get(nid, {})),
                state=RecordDict(), run_config={},
            )
            for nid in self.apps
        }
        self.tamper = tamper  # a malicious coordinator rewriting what a node receives
        self.on_deliver = on_deliver  # (message as the coordinator sent it, handler seconds,
        # bytes both ways)
        self._replies: dict[str, Message] = {}

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
        """One message to its node; the node's reply (an error reply if the app raised)."""
        msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        sent, n_out = _over_the_wire(msg)
        if self.tamper is not None:
            sent = self.tamper(sent)
        nid = sent.metadata.dst_node_id
        t0 = time.perf_counter()
        try:
            # In a fresh context: a site shares nothing with the coordinator's thread, as in
            # its own process (its mask binding, `common.secure_masks.bound_to`, included).
            reply = contextvars.Context().run(self.apps[nid], sent, self.contexts[nid])
        except Exception as exc:  # the runtime turns a raising ClientApp into an error reply
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=sent)
        seconds = time.perf_counter() - t0
        reply.metadata.__dict__["_src_node_id"] = nid
        back, n_in = _over_the_wire(reply)
        if self.on_deliver is not None:  # the coordinator's copy: apps may mutate theirs
            self.on_deliver(msg, seconds, n_out + n_in)
        return back

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

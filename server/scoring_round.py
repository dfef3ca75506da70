"""The scoring half of a round: every site scores the candidates and keeps the results.

Why apart from SecAgg+: scoring a real model takes minutes to hours per candidate, and the
SecAgg+ stages have one timeout each. When scoring ran inside the masked-vector stage, a site
that took longer was declared dead inside the protocol, and the rounds failed in a cascade.
Here the coordinator asks each site for one candidate at a time (`query.score`), so it sees
how far every site has got (n of m candidates, never a count), gives each candidate the
recipe's scoring timeout, and hands only the sites that finished to the SecAgg+ exchange.
A site never has two requests outstanding: the next candidate goes out when the previous
one is answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from common.protocol import (
    INSTRUCTIONS_KEY,
    RECORD_NAME,
    REPLY_KEY,
    SCORE_MESSAGE_TYPE,
    Refusal,
    RoundInstructions,
    ScoreProgress,
    ScoreRequest,
)
from server.grid import CoordinatorGrid

POLL_S = 0.1


@dataclass
class ScoringOutcome:
    """Who holds every candidate now, who failed (and the code they gave), who was too slow."""

    ready: list[int]
    failed: dict[int, str] = field(default_factory=dict)  # node -> error reason (a Refusal)
    slow: dict[int, int] = field(default_factory=dict)  # node -> candidates done at the deadline


def _request(grid: CoordinatorGrid, node: int, instr: RoundInstructions, index: int,
             ttl: float) -> Message:
    req = ScoreRequest(instructions=instr, index=index)
    content = RecordDict({RECORD_NAME: ConfigRecord({INSTRUCTIONS_KEY: req.model_dump_json()})})
    return Message(
        content=content,
        dst_node_id=node,
        message_type=SCORE_MESSAGE_TYPE,
        group_id=f"score-{instr.round}",
        ttl=ttl,
    )


def score_round(
    grid: CoordinatorGrid,
    node_ids: list[int],
    instr: RoundInstructions,
    *,
    timeout_per_candidate: float,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> ScoringOutcome:
    """Have every node score every candidate of `instr`; return who is ready for SecAgg+.

    `on_progress(node, done, total)` is called on each answer.
    """
    total = len(instr.candidates)
    ttl = 2 * timeout_per_candidate + 60.0
    outcome = ScoringOutcome(ready=[])
    pending: dict[str, tuple[int, int, float]] = {}  # message id -> (node, index, deadline)

    def send(node: int, index: int) -> None:
        ids = list(grid.push_messages([_request(grid, node, instr, index, ttl)]))
        # The first candidate also pays the round's one-time work (policy check, loading the
        # fold and tokenizing it): it gets twice the budget.
        budget = timeout_per_candidate * (2 if index == 0 else 1)
        if ids and ids[0]:
            pending[ids[0]] = (node, index, time.monotonic() + budget)
        else:
            outcome.failed[node] = Refusal(site=f"node-{node}", reason="unreachable").to_reason()

    for node in node_ids:
        send(node, 0)
        if on_progress is not None:
            on_progress(node, 0, total)
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node, index, _ = pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                outcome.failed[node] = reply.error.reason or ""
                continue
            progress = ScoreProgress.model_validate_json(
                str(reply.content.config_records[RECORD_NAME][REPLY_KEY])
            )
            if progress.done != index + 1 or progress.total != total:
                outcome.failed[node] = Refusal(
                    site=progress.site, reason="score:unexpected-progress"
                ).to_reason()
                continue
            if on_progress is not None:
                on_progress(node, progress.done, total)
            if progress.done == total:
                outcome.ready.append(node)
            else:
                send(node, progress.done)
        now = time.monotonic()
        for mid, (node, index, deadline) in list(pending.items()):
            if now >= deadline:
                del pending[mid]
                outcome.slow[node] = index
        if pending:
            time.sleep(POLL_S)
    outcome.ready.sort()
    return outcome

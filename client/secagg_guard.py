"""SecAgg+ as the site checks it: Flower's client mod behind the site's own rules.

Why: Flower 1.41's `secaggplus_mod` trusts the server completely. It takes any threshold and
share count, and at UNMASK it answers a list that names a site as both active and dead with
both of that site's secret shares (its private-mask seed and its pairwise-mask key), from
which a coordinator rebuilds that site's masks and reads its vector exactly. Its failures
are exceptions (`KeyError` on `sk1_share_dict`, "Abort secure aggregation: expect unmask
stage"), which the runtime prints as tracebacks and which leave half a round in the node's
state for the next one.

This guard checks every stage against the site's policy before Flower's mod runs, keeps
fedmerge's ChaCha20 masks, answers any violation with a refusal naming the rule (a fixed
code, no free text), and wipes the SecAgg+ state on a refusal, on a new setup and after
unmasking, so the next round starts clean. Checks per stage:

- setup: at least `min_sites` sites sampled, a threshold of at least a strict majority of
  them and at least `min_sites`, and at most as many shares as sites (so no two disjoint
  groups of shareholders can each reach the threshold);
- share_keys / collect: this site among the key holders, at least the threshold of them,
  no source it did not exchange keys with;
- unmask: no site both active and dead, this site not dead, at least `max(min_sites,
  threshold)` active, only sites that exchanged keys with this one, and the site's own rule
  on the number summed (`GuardPolicy.at_unmask`: the ledger's sum sizes); shares are
  released once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message
from flwr.app.error import Error

from common.protocol import REFUSAL_CODE, Refusal

GUARD_RECORD = "fedmerge.secagg_guard"  # the round (group id) whose SecAgg+ run is in progress

log = logging.getLogger("fedmerge.node")


@dataclass(frozen=True)
class GuardPolicy:
    """What this site demands of a SecAgg+ round (from its SitePolicy)."""

    site: str
    min_sites: int
    # The site's own rule at UNMASK, given how many sites' vectors the sum holds (the active
    # list) and the round (group id): a rule code to refuse with, or None
    # (`client.client_app.unmask_rule`).
    at_unmask: Callable[[int, str], str | None] | None = None

    def min_threshold(self, sampled: int) -> int:
        return max(sampled // 2 + 1, self.min_sites)


class SecAggRefused(Exception):
    """A rule of the site's SecAgg+ policy was broken; `rule` is the code that travels."""

    def __init__(self, rule: str):
        super().__init__(rule)
        self.rule = rule


class _HandlerReply(Exception):
    """The ClientApp's own error reply (a policy refusal): passed back to the server as is."""

    def __init__(self, reply: Message):
        super().__init__("handler refused")
        self.reply = reply


def reset(context: Context) -> None:
    """Forget every SecAgg+ secret and the round in progress (an empty state accepts setup)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
    context.state.config_records.pop(GUARD_RECORD, None)


def refusal(msg: Message, site: str, rule: str) -> Message:
    return Message(
        Error(code=REFUSAL_CODE, reason=Refusal(site=site, reason=rule).to_reason()), reply_to=msg
    )


def _check_stage(stage: str, cfg, state, policy: GuardPolicy, group: str, guard) -> None:
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    order = Stage.all()
    if stage not in order:
        raise SecAggRefused("secagg:not-a-secagg-message")
    if stage != Stage.SETUP:
        expected = order[(order.index(state.current_stage) + 1) % len(order)]
        if guard is None or stage != expected or str(guard["group"]) != group:
            raise SecAggRefused("secagg:stage-out-of-order")
    if stage == Stage.SETUP:
        n, s, t = (cfg.get(Key.SAMPLE_NUMBER), cfg.get(Key.SHARE_NUMBER), cfg.get(Key.THRESHOLD))
        if not all(type(v) is int for v in (n, s, t)):
            raise SecAggRefused("secagg:setup-malformed")
        if n < policy.min_sites:
            raise SecAggRefused("secagg:too-few-sites")
        if t < policy.min_threshold(n) or s < t or s > n or 2 * t <= s:
            raise SecAggRefused("secagg:threshold-below-policy")
    elif stage == Stage.SHARE_KEYS:
        holders = {int(k) for k in cfg if k != Key.STAGE}
        if state.nid not in holders or not state.threshold <= len(holders) <= state.share_num:
            raise SecAggRefused("secagg:share-keys-invalid")
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        sources = list(cfg.get(Key.SOURCE_LIST) or [])
        if len(sources) + 1 < state.threshold or not set(sources) <= set(state.public_keys_dict):
            raise SecAggRefused("secagg:collect-invalid")
    else:
        active = list(cfg.get(Key.ACTIVE_NODE_ID_LIST) or [])
        dead = list(cfg.get(Key.DEAD_NODE_ID_LIST) or [])
        if len(set(active)) != len(active) or len(set(dead)) != len(dead):
            raise SecAggRefused("secagg:unmask-lists-a-site-twice")
        if set(active) & set(dead):
            raise SecAggRefused("secagg:unmask-active-and-dead")
        if state.nid in dead or state.nid not in active:
            raise SecAggRefused("secagg:unmask-lists-this-site-dead")
        if len(active) < max(policy.min_sites, state.threshold):
            raise SecAggRefused("secagg:unmask-too-few-active")
        if not (set(active) | set(dead)) <= set(state.rd_seed_share_dict):
            raise SecAggRefused("secagg:unmask-unknown-site")


def masks_bound_to_round(msg: Message, masking: bool):
    """While this site masks its vector: masks bound to the round's instructions as this site
    received them (`common.secure_masks.bound_to`), so that sites told different terms draw
    pairwise masks that do not cancel. A message without instructions is left unbound (the
    site's handler refuses it)."""
    import contextlib

    if not masking:
        return contextlib.nullcontext()
    import hashlib

    import flwr.compat.common.recorddict_compat as compat

    from common.protocol import INSTRUCTIONS_KEY
    from common.secure_masks import bound_to

    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        raw = str(fitins.config[INSTRUCTIONS_KEY])
    except Exception:  # noqa: BLE001 - not fedmerge's round: nothing to bind to
        return contextlib.nullcontext()
    # The text as received, hashed as the coordinator hashed the text it sent
    # (`instructions_digest`): no re-serialization for a version difference to change.
    return bound_to(hashlib.sha256(raw.encode()).digest())


def checked_secaggplus_mod(policy_of: Callable[[Context], GuardPolicy]):
    """Flower's SecAgg+ client mod, run only for requests the site's policy allows."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        from flwr.app.message_type import MessageType

        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        from flwr.client.mod import secaggplus_mod
        from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            RECORD_KEY_STATE,
            Key,
            Stage,
        )

        from common.secure_masks import install

        install()
        policy = policy_of(context)
        group = str(msg.metadata.group_id)
        guard = context.state.config_records.get(GUARD_RECORD)
        state = SecAggPlusState(**context.state.config_records.get(RECORD_KEY_STATE, {}))
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = cfg.get(Key.STAGE) if cfg is not None else None
        if stage != Stage.SETUP and guard is not None and str(guard["group"]) != group:
            # A late message of an earlier round: refuse it without disturbing this one.
            return refusal(msg, policy.site, "secagg:stale-round")
        try:
            _check_stage(stage, cfg, state, policy, group, guard)
            if stage == Stage.UNMASK and policy.at_unmask is not None:
                rule = policy.at_unmask(len(list(cfg.get(Key.ACTIVE_NODE_ID_LIST) or [])), group)
                if rule is not None:
                    raise SecAggRefused(rule)
            if stage == Stage.SETUP:
                reset(context)
                context.state.config_records[GUARD_RECORD] = ConfigRecord({"group": group})

            def handler(m: Message, c: Context) -> Message:
                try:
                    reply = call_next(m, c)
                except Exception:  # details stay in the node's log, a code goes out
                    log.exception("SecAgg+ round %s: the site's handler failed", group)
                    raise _HandlerReply(refusal(m, policy.site, "site:handler-failed")) from None
                if reply.has_error():
                    raise _HandlerReply(reply)
                return reply

            with masks_bound_to_round(msg, stage == Stage.COLLECT_MASKED_VECTORS):
                reply = secaggplus_mod(msg, context, handler)
            if stage == Stage.UNMASK:
                reset(context)  # the shares are out: nothing of this round may be released again
            return reply
        except _HandlerReply as exc:
            reset(context)
            return exc.reply
        except SecAggRefused as exc:
            reset(context)
            return refusal(msg, policy.site, exc.rule)
        except Exception:  # Flower's own checks (KeyError, ValueError): a protocol violation
            reset(context)
            return refusal(msg, policy.site, "secagg:protocol-error")

    return mod

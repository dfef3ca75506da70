"""The hospital node as a Flower ClientApp: decode a message, check policy, reply.

Three kinds of message reach it:
- `query` carries the coordinator's announcement; the site checks its policy and answers
  with its name, or an error reply naming the rule it refuses by;
- `query.score` asks for one candidate of a round: the site re-checks its policy (at the
  first candidate), scores it with `client.task` and KEEPS the histograms in its own node
  state; the reply says only how many candidates it holds. Scoring takes as long as the
  model needs, outside any SecAgg+ stage;
- `train` is a SecAgg+ round over the vectors the sites already hold. The site's guard
  (`client.secagg_guard`) checks every stage against its policy; at the masked-vector stage
  `handle_round` hands the stored vector to the mask, once.
Nothing else leaves the site: empty metrics and a constant example count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from client.node_config import NodeConfig, parse_node_config, simulated_node_config
from client.policy import RULES
from client.secagg_guard import GuardPolicy, checked_secaggplus_mod
from client.site_log import fingerprints, site_event
from common.errors import FedmergeError
from common.protocol import (
    INSTRUCTIONS_KEY,
    PROTOCOL_VERSION,
    RECORD_NAME,
    REFUSAL_CODE,
    REPLY_KEY,
    Announcement,
    PolicyReply,
    Refusal,
    RoundInstructions,
    ScoreProgress,
    ScoreRequest,
    instructions_digest,
)

ParentsFn = Callable[[], tuple[Path, Path]]

ACCEPTED_RECORD = "fedmerge.accepted"
SECAGG_STATE_RECORD = "secaggplus_state"  # flwr's RECORD_KEY_STATE, checked in tests
# The scored round the site holds: histograms per candidate, and what they answer.
SCORED_ARRAYS = "fedmerge.scored"
SCORED_META = "fedmerge.scored.meta"
# What this site released in the SecAgg+ round in progress, for the check at its UNMASK.
PENDING_SUM = "fedmerge.pending_sum"

log = logging.getLogger("fedmerge.node")


def resolve_node_config(
    context: Context,
    overrides: Mapping[int, Mapping[str, object]] | None = None,
    default_parents: ParentsFn | None = None,
) -> NodeConfig:
    """This node's settings: its own node config, a simulation override, or `flwr run` defaults."""
    raw = dict(context.node_config)
    pid = raw.get("partition-id")
    if overrides is not None and pid is not None and int(pid) in overrides:
        raw.update(overrides[int(pid)])
    elif "data" not in raw and pid is not None:
        raw.update(
            simulated_node_config(
                int(pid),
                int(raw.get("num-partitions", 1)),
                context.run_config,
                _run_parents(context, default_parents),
            )
        )
    return parse_node_config(raw)


def _run_parents(context: Context, default_parents: ParentsFn | None) -> tuple[Path, Path]:
    a, b = context.run_config.get("parent-a"), context.run_config.get("parent-b")
    if a and b:
        return Path(str(a)), Path(str(b))
    if default_parents is None:
        raise FedmergeError(
            "run config: parent-a and parent-b are empty and this app has no default parents; "
            "expected both parent directories"
        )
    return default_parents()


def _refuse(msg: Message, site: str, reason: str) -> Message:
    return Message(
        Error(code=REFUSAL_CODE, reason=Refusal(site=site, reason=reason).to_reason()), reply_to=msg
    )


class _AnnouncementRate:
    """Announcements this node process answered in the last hour, per site name.

    Why: every answered announcement teaches the coordinator something (a code for a rule),
    and a site's data is loaded to check cohort sizes; a cap bounds how fast a coordinator can
    probe the policy with variations. Kept in the process (the node's persistent worker), so
    a restart resets it: a bound on rate, not on the total (the ledger bounds releases).
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._times: dict[str, list[float]] = {}

    def reset(self) -> None:
        with self._lock:
            self._times.clear()

    def admit(self, site: str, per_hour: int, now: float | None = None) -> bool:
        import time

        now = time.time() if now is None else now
        with self._lock:
            recent = [t for t in self._times.get(site, []) if t > now - 3600.0]
            if len(recent) >= per_hour:
                self._times[site] = recent
                return False
            self._times[site] = [*recent, now]
            return True


_ANNOUNCEMENTS = _AnnouncementRate()


def handle_announcement(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """Policy check before any SecAgg+ round; accept with the site's name or refuse."""
    from client.task import check_announcement

    site = cfg.site or "site"
    node_key = repr((cfg.site, cfg.data, cfg.simulated))
    if not _ANNOUNCEMENTS.admit(node_key, cfg.policy.max_announcements_per_hour):
        log.info("announcement refused: policy:announcement-rate")
        return _refuse(msg, site, "policy:announcement-rate")
    try:
        ann = Announcement.model_validate_json(
            str(msg.content.config_records[RECORD_NAME][INSTRUCTIONS_KEY])
        )
    except (KeyError, ValueError):
        return _refuse(msg, site, "request:malformed")
    reason = _run_rule(context, ann)
    earlier = context.state.config_records.get(ACCEPTED_RECORD)
    if reason is None and earlier is not None:  # the same again (a retry): counts kept
        return _accepted(msg, str(earlier["site"]))
    if reason is None:
        try:
            site, reason = check_announcement(cfg, ann)
        except (FedmergeError, OSError, ValueError):
            # The details (paths, ids in a data error) stay in the node's log: a code leaves.
            log.exception("announcement: this node cannot load its data or parents")
            site_event("failed", run=context.run_id, stage="announcement",
                       rule="site:data-unavailable")
            return _refuse(msg, site, "site:data-unavailable")
    if reason:
        log.info("announcement refused: %s (%s)", reason, RULES.get(reason, ""))
        site_event("refused", run=context.run_id, stage="announcement", rule=reason)
        return _refuse(msg, site, reason)
    site_event("accepted", run=context.run_id, sites=ann.sites, method=ann.method,
               max_candidates=ann.max_candidates_per_round,
               fingerprints=fingerprints(ann.parent_fingerprints))
    # What was accepted, whole: every round is held to it (and counted against the policy).
    context.state.config_records[ACCEPTED_RECORD] = ConfigRecord(
        {"site": site, "announcement": ann.model_dump_json(), "rounds": 0}
    )
    return _accepted(msg, site)


def _run_rule(context: Context, ann: Announcement) -> str | None:
    """The rule an announcement breaks as part of this run, checked before any data loads.

    Another protocol version would score, spend budget, then fail to unmask with the others.
    Another announcement in the same run (the context's state is the run's; a new run may
    announce anything) would start the run's counts again (rounds, noisy releases per fold)
    or lower the sites a sum must have after a round was scored for more.
    """
    if ann.protocol != PROTOCOL_VERSION:
        return "policy:protocol-version"
    earlier = context.state.config_records.get(ACCEPTED_RECORD)
    if earlier is not None and str(earlier["announcement"]) != ann.model_dump_json():
        return "policy:announcement-changed"
    return None


def _accepted(msg: Message, site: str) -> Message:
    reply = PolicyReply(site=site).model_dump_json()
    return Message(RecordDict({RECORD_NAME: ConfigRecord({REPLY_KEY: reply})}), reply_to=msg)


def read_instructions(msg: Message) -> RoundInstructions:
    """The round's instructions, from the config of the SecAgg+ fit message."""
    import flwr.compat.common.recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return RoundInstructions.model_validate_json(str(fitins.config[INSTRUCTIONS_KEY]))


def histogram_reply(msg: Message, histograms, bins: int, noisy: bool = False) -> Message:
    """The only thing a site returns in a round: its histograms as one integer vector, which
    the SecAgg+ mod masks on the way out; no metrics, a constant example count."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from common.secure_sum import SITE_WEIGHT, encode_histograms

    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([encode_histograms(histograms, bins, noisy=noisy)]),
        num_examples=SITE_WEIGHT,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _min_summed(context: Context, cfg: NodeConfig) -> int:
    """Fewest sites this site's vector may be summed with: its `min_sites`, raised to the
    honest sites a distributed-noise run assumes (fewer would carry too little noise)."""
    accepted = context.state.config_records.get(ACCEPTED_RECORD)
    if accepted is None:
        return cfg.policy.min_sites
    privacy = Announcement.model_validate_json(str(accepted["announcement"])).privacy
    if privacy.mode == "distributed":
        return max(cfg.policy.min_sites, privacy.honest_sites)
    return cfg.policy.min_sites


def _site(context: Context, cfg: NodeConfig) -> str:
    accepted = context.state.config_records.get(ACCEPTED_RECORD)
    return str(accepted["site"]) if accepted is not None else (cfg.site or "site")


def _fault(cfg: NodeConfig, stage: str) -> float | None:
    """Test-only fault injection: None, or seconds to stall (-1: fail) at `stage`."""
    if not cfg.test_fault:
        return None
    kind, _, rest = cfg.test_fault.partition(":")
    if kind == "drop":  # the historical name: fail inside the SecAgg+ round
        kind, rest = "fail", "collect_masked_vectors"
    where, _, seconds = rest.partition(":")
    if where != stage:
        return None
    return -1.0 if kind == "fail" else float(seconds or 0)


def handle_score(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """Score one candidate of a round and keep its histograms here; reply with progress only."""
    import time

    from client.task import check_round, score_one

    site = _site(context, cfg)
    try:
        req = ScoreRequest.model_validate_json(
            str(msg.content.config_records[RECORD_NAME][INSTRUCTIONS_KEY])
        )
    except (KeyError, ValueError):
        return _refuse(msg, site, "request:malformed")
    instr = req.instructions
    digest = instructions_digest(instr)
    meta = context.state.config_records.get(SCORED_META)
    if req.index == 0:
        accepted = context.state.config_records.get(ACCEPTED_RECORD)
        try:
            reason = check_round(
                cfg,
                instr,
                accepted=(
                    Announcement.model_validate_json(str(accepted["announcement"]))
                    if accepted is not None else None
                ),
                rounds_so_far=int(accepted["rounds"]) if accepted is not None else 0,
            )
        except FedmergeError:
            log.exception("round %s: policy check failed", instr.round)
            site_event("failed", run=context.run_id, round=instr.round, stage="round",
                       rule="site:data-unavailable")
            return _refuse(msg, site, "site:data-unavailable")
        reason = reason or _check_ledger(cfg, context, instr, instr.sites, record=False)[0]
        if reason:
            log.info("round %s refused: %s (%s)", instr.round, reason, RULES.get(reason, ""))
            site_event("refused", run=context.run_id, round=instr.round, stage="round",
                       rule=reason)
            return _refuse(msg, site, reason)
        site_event("round", run=context.run_id, round=instr.round, stage=instr.stage,
                   fold=instr.fold, sites=instr.sites, candidates=len(instr.candidates),
                   fingerprints=fingerprints(instr.parent_fingerprints))
        accepted["rounds"] = int(accepted["rounds"]) + 1
        # A new round: whatever an earlier round left is dropped, released or not.
        context.state.array_records[SCORED_ARRAYS] = ArrayRecord()
        meta = ConfigRecord({"digest": digest, "round": instr.round, "done": 0, "spent": False})
        context.state.config_records[SCORED_META] = meta
    elif meta is None or meta["digest"] != digest or int(meta["done"]) != req.index:
        return _refuse(msg, site, "score:out-of-order")
    stall = _fault(cfg, "score")
    if stall is not None and stall < 0:
        return _refuse(msg, site, "site:scoring-failed")
    if stall:
        time.sleep(stall)
    try:
        pos, neg = score_one(cfg, instr, req.index)
    except Exception:  # the details stay in the node's log; the coordinator gets a code
        log.exception("round %s: scoring candidate %s failed", instr.round, req.index)
        site_event("failed", run=context.run_id, round=instr.round, stage="score",
                   rule="site:scoring-failed")
        return _refuse(msg, site, "site:scoring-failed")
    context.state.array_records[SCORED_ARRAYS][str(req.index)] = Array(
        np.concatenate([pos, neg]).astype(np.int64)
    )
    meta["done"] = req.index + 1
    progress = ScoreProgress(site=site, round=instr.round, done=req.index + 1,
                             total=len(instr.candidates))
    return Message(
        RecordDict({RECORD_NAME: ConfigRecord({REPLY_KEY: progress.model_dump_json()})}),
        reply_to=msg,
    )


def stored_histograms(context: Context, instr: RoundInstructions):
    """The histograms this site scored for `instr`, or the rule that forbids releasing them."""
    meta = context.state.config_records.get(SCORED_META)
    if meta is None or meta["digest"] != instructions_digest(instr):
        return None, "round:not-scored"
    if bool(meta["spent"]):
        return None, "round:already-released"
    if int(meta["done"]) != len(instr.candidates):
        return None, "round:not-scored"
    arrays = context.state.array_records[SCORED_ARRAYS]
    bins = instr.histogram.bins
    out = []
    for i in range(len(instr.candidates)):
        both = arrays[str(i)].numpy()
        out.append((both[:bins], both[bins:]))
    return out, None


def handle_round(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """The SecAgg+ masked-vector stage: hand over the stored histograms, once."""
    site = _site(context, cfg)
    instr = read_instructions(msg)
    # Group ids (round numbers) repeat across runs: a release of an earlier round that never
    # reached UNMASK must not stand in for this one, which may be refused below.
    context.state.config_records.pop(PENDING_SUM, None)
    histograms, rule = stored_histograms(context, instr)
    state = context.state.config_records.get(SECAGG_STATE_RECORD)
    sampled = int(state["sample_num"]) if state is not None else instr.sites
    release = None
    if rule is None:
        rule = _check_privacy_release(context, instr, sampled)
        if rule is None:
            rule, release = _check_ledger(cfg, context, instr, sampled, record=True)
    if rule is not None:
        log.info("round %s: release refused: %s", instr.round, rule)
        site_event("refused", run=context.run_id, round=instr.round, stage="release", rule=rule)
        return _refuse(msg, site, rule)
    # Released at most once: a second sum over other sites would isolate this one.
    context.state.config_records[SCORED_META]["spent"] = True
    context.state.config_records[PENDING_SUM] = ConfigRecord({
        "release": release.model_dump_json() if release is not None else "",
        "group": str(msg.metadata.group_id)})
    from client.task import noisy_release

    reply = histogram_reply(
        msg, noisy_release(histograms, instr), instr.histogram.bins, noisy=instr.privacy.on
    )
    site_event("released", run=context.run_id, round=instr.round, stage=instr.stage,
               fold=instr.fold, sites=sampled, candidates=len(instr.candidates),
               vector=_vector_length(reply), privacy=instr.privacy.mode)
    if instr.stage == "test":  # the held-out round is a run's last
        site_event("finished", run=context.run_id, round=instr.round)
    return reply


def _vector_length(reply: Message) -> int:
    """Entries of the integer vector this site hands to SecAgg+ (the only thing it sends)."""
    arrays = reply.content.array_records
    return sum(int(a.numpy().size) for rec in arrays.values() for a in rec.values())


def _check_privacy_release(context: Context, instr: RoundInstructions, sampled: int
                           ) -> str | None:
    """A private run may release each fold for at most the announced number of candidates
    (what its noise was calibrated for), and distributed noise only into a sum of at least
    the sites it assumes honest."""
    p = instr.privacy
    if not p.on:
        return None
    if p.mode == "distributed" and sampled < p.honest_sites:
        return "dp:too-few-sites"
    accepted = context.state.config_records.get(ACCEPTED_RECORD)
    key = f"released.fold{instr.fold}"
    done = int(accepted[key]) if accepted is not None and key in accepted else 0
    if done + len(instr.candidates) > p.releases:
        return "dp:releases-exhausted"
    if accepted is not None:
        accepted[key] = done + len(instr.candidates)
    return None


def _check_ledger(cfg: NodeConfig, context: Context, instr: RoundInstructions, sites: int,
                  *, record: bool):
    """The ledger's objection to releasing `instr` summed over `sites` sites, if any, and the
    release as the ledger holds it (None without a ledger); with `record`, the release is
    written down before the vector leaves."""
    if cfg.ledger is None:
        return None, None
    from client.ledger import ReleaseLedger, release_of

    ledger = ReleaseLedger(cfg.ledger)
    release = release_of(instr, run=int(context.run_id), sites=sites)
    privacy = cfg.policy.privacy
    rule = ledger.check(release, cfg.policy.max_releases_per_day,
                        budget=(privacy.max_epsilon_total, privacy.max_delta))
    if rule is None and record:
        ledger.record(release)
    return rule, release


def unmask_rule(context: Context, cfg: NodeConfig, summed: int, group: str) -> str | None:
    """At UNMASK of round `group`, with `summed` sites' vectors in the sum (the active list):
    the rule that forbids handing over this round's shares, or None.

    Why here and not when the vector left: only UNMASK settles who is summed, as far as
    this site can see. A coordinator that drops a sampled site there (its vector never
    collected) shrinks the sum after every check on the sampled count passed. An exact sum
    must agree in size with every earlier one of the same fold, terms and candidate
    (`ReleaseLedger.check_sum`), and is written down as a `sum` line before any share leaves
    (if the round then fails, the line stays: it can only make later sums stricter). The
    size is the one the coordinator shows THIS site: sites do not see one another's rosters
    (see `client.ledger`). Distributed noise needs no rule here: the guard's `min_sites` is
    already raised to the run's honest sites (`_min_summed`), so a smaller active list is
    refused as `secagg:unmask-too-few-active`.
    """
    pending = context.state.config_records.get(PENDING_SUM)
    if pending is None or str(pending["group"]) != group:
        return None  # no vector of this site in this round's sum (the guard checks the rest)
    context.state.config_records.pop(PENDING_SUM)
    if not str(pending["release"]) or cfg.ledger is None:
        return None
    import time

    from client.ledger import Release, ReleaseLedger

    release = Release.model_validate_json(str(pending["release"]))
    if release.rho > 0:
        return None  # noisy: charged when it left, whoever is summed
    ledger = ReleaseLedger(cfg.ledger)
    line = release.model_copy(update={"kind": "sum", "sites": summed, "time": time.time()})
    try:
        rule = ledger.check_sum(line)
        if rule is None:
            ledger.record(line)
    except (FedmergeError, OSError):  # an unreadable or unwritable ledger: nothing is answered
        log.exception("UNMASK of round %s: the release ledger failed", group)
        return "site:handler-failed"
    return rule


def _fault_mod(node: Callable[[Context], NodeConfig]):
    """Test-only: make a node fail or stall at a SecAgg+ stage (node config `test-fault`)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        import time

        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        cfg = node(context)
        if cfg.test_fault and msg.metadata.message_type == "train":
            record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            stall = _fault(cfg, str(record.get("stage")) if record is not None else "")
            if stall is not None and stall < 0:
                return _refuse(msg, _site(context, cfg), "site:failed")
            if stall:
                time.sleep(stall)
        return call_next(msg, context)

    return mod


def codes_only(msg: Message, context: Context, call_next) -> Message:
    """The app's outermost mod: whatever fails inside (a node setting, a loader, torch, a
    mod), the coordinator gets `site:handler-failed`, never the exception's text (which may
    hold paths, record ids or patient text); the traceback goes to this node's log."""
    try:
        return call_next(msg, context)
    except Exception:
        log.exception("%s message failed at this node", msg.metadata.message_type)
        accepted = context.state.config_records.get(ACCEPTED_RECORD)
        site = str(accepted["site"]) if accepted is not None else "site"
        return _refuse(msg, site, "site:handler-failed")


def make_client_app(
    overrides: Mapping[int, Mapping[str, object]] | None = None,
    default_parents: ParentsFn | None = None,
) -> ClientApp:
    """The hospital ClientApp. `overrides` (partition id -> node config) is for simulation;
    `default_parents` supplies parents when a `flwr run` simulation's run config has none."""
    client_app = ClientApp(mods=[codes_only])

    def node(context: Context) -> NodeConfig:
        return resolve_node_config(context, overrides, default_parents)

    def guard_policy(context: Context) -> GuardPolicy:
        cfg = node(context)
        return GuardPolicy(site=_site(context, cfg), min_sites=_min_summed(context, cfg),
                           at_unmask=lambda summed, group: unmask_rule(context, cfg, summed,
                                                                       group))

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_announcement(msg, context, node(context))

    @client_app.query("score")
    def score(msg: Message, context: Context) -> Message:
        return handle_score(msg, context, node(context))

    @client_app.train(mods=[_fault_mod(node), checked_secaggplus_mod(guard_policy)])
    def train(msg: Message, context: Context) -> Message:
        return handle_round(msg, context, node(context))

    return client_app


app = make_client_app()

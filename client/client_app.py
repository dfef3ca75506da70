"""The hospital node: a Flower ClientApp that scores merges locally, answering through SecAgg+.

Two kinds of message reach it. A QUERY carries the coordinator's announcement; the site checks
its policy and answers with its name or an error reply that says why it refuses. A TRAIN
message is one SecAgg+ round: the mod runs the key exchange and, at the masked-vector stage,
calls `handle_round`, which re-checks the policy, switches the merge in place per candidate,
scores the fold and returns the concatenated histograms as the one vector SecAgg+ masks.
Nothing else leaves the site: empty metrics and a constant example count.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from client.node_config import NodeConfig, parse_node_config, simulated_node_config
from client.protocol import (
    INSTRUCTIONS_KEY,
    RECORD_NAME,
    REFUSAL_CODE,
    REPLY_KEY,
    Announcement,
    PolicyReply,
    Refusal,
    RoundInstructions,
)
from common.errors import FedmergeError

ACCEPTED_RECORD = "fedmerge.accepted"
SECAGG_STATE_RECORD = "secaggplus_state"  # flwr's RECORD_KEY_STATE, checked in tests


class PolicyRefused(FedmergeError):
    """Raised inside a SecAgg+ round: the runtime turns it into an error reply."""


def secure_mod(msg: Message, context: Context, call_next):
    """Flower's SecAgg+ client mod, with fedmerge's cryptographic masks installed first."""
    from flwr.client.mod import secaggplus_mod

    from common.secure_masks import install

    install()
    return secaggplus_mod(msg, context, call_next)


def resolve_node_config(
    context: Context, overrides: Mapping[int, Mapping[str, object]] | None = None
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
                _run_parents(context),
            )
        )
    return parse_node_config(raw)


def _run_parents(context: Context):
    from pathlib import Path

    a, b = context.run_config.get("parent-a"), context.run_config.get("parent-b")
    if a and b:
        return Path(str(a)), Path(str(b))
    from simulation.demo_parents import demo_parent_dirs

    return demo_parent_dirs()


def _own_fingerprints(cfg: NodeConfig) -> tuple[str, str]:
    from client.state import parent_fingerprint

    return parent_fingerprint(cfg.parent_a), parent_fingerprint(cfg.parent_b)


def _refuse(msg: Message, site: str, reason: str) -> Message:
    return Message(
        Error(code=REFUSAL_CODE, reason=Refusal(site=site, reason=reason).to_reason()), reply_to=msg
    )


def handle_announcement(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """Policy check before any SecAgg+ round; accept with the site's name or refuse."""
    from client import policy
    from client.state import fold_counts, site_records

    site = cfg.site or "site"
    try:
        ann = Announcement.model_validate_json(
            str(msg.content.config_records[RECORD_NAME][INSTRUCTIONS_KEY])
        )
        site, _ = site_records(cfg, ann.scoring.hard)
        counts = {
            f: fold_counts(cfg, f, ann.folds, ann.fold_seed, ann.scoring.hard)
            for f in ann.score_folds
        }
        reason = policy.first_refusal(
            policy.check_sites(cfg.policy, ann.sites),
            policy.check_count(cfg.policy, ann.max_candidates_per_round),
            policy.check_parents(_own_fingerprints(cfg), ann.parent_fingerprints),
            policy.check_cohort(cfg.policy, counts),
        )
    except (FedmergeError, KeyError, ValueError) as exc:
        return _refuse(msg, site, f"node cannot take part: {exc}")
    if reason:
        return _refuse(msg, site, reason)
    context.state.config_records[ACCEPTED_RECORD] = ConfigRecord(
        {"recipe": ann.recipe_fingerprint, "site": site}
    )
    reply = PolicyReply(site=site).model_dump_json()
    return Message(RecordDict({RECORD_NAME: ConfigRecord({REPLY_KEY: reply})}), reply_to=msg)


def _sites_in_round(context: Context, announced: int) -> int:
    # SecAgg+'s own setup told this node how many sites were sampled; trust the smaller.
    state = context.state.config_records.get(SECAGG_STATE_RECORD)
    sampled = state.get("sample_num") if state is not None else None
    return min(announced, int(sampled)) if sampled else announced


def read_instructions(msg: Message) -> RoundInstructions:
    """The round's instructions, from the config of the SecAgg+ fit message."""
    import flwr.compat.common.recorddict_compat as compat

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return RoundInstructions.model_validate_json(str(fitins.config[INSTRUCTIONS_KEY]))


def histogram_reply(msg: Message, histograms, bins: int) -> Message:
    """The only thing a site returns in a round: its histograms as one integer vector, which
    the SecAgg+ mod masks on the way out; no metrics, a constant example count."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from common.secure_sum import SITE_WEIGHT, encode_histograms

    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([encode_histograms(histograms, bins)]),
        num_examples=SITE_WEIGHT,
        metrics={},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def handle_round(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """Score every candidate on the fold and return the histograms as one integer vector."""
    from client import policy
    from client.state import fold_counts, fold_data, merger
    from common.metrics import score_histograms

    instr = read_instructions(msg)
    accepted = context.state.config_records.get(ACCEPTED_RECORD)
    site = str(accepted["site"]) if accepted is not None else (cfg.site or "site")
    if cfg.test_fault == "drop":
        raise RuntimeError(f"{site}: injected fault (test-fault=drop)")
    if accepted is None or accepted["recipe"] != instr.recipe_fingerprint:
        reason = "round does not match the recipe this site accepted"
    else:
        counts = {
            instr.fold: fold_counts(
                cfg, instr.fold, instr.folds, instr.fold_seed, instr.scoring.hard
            )
        }
        reason = policy.first_refusal(
            policy.check_sites(cfg.policy, _sites_in_round(context, instr.sites)),
            policy.check_candidates(cfg.policy, instr.candidates),
            policy.check_parents(_own_fingerprints(cfg), instr.parent_fingerprints),
            policy.check_cohort(cfg.policy, counts),
        )
    if reason:
        raise PolicyRefused(Refusal(site=site, reason=reason).to_reason())

    live_scorer, data = fold_data(
        cfg, instr.method, instr.scoring, instr.fold, instr.folds, instr.fold_seed
    )
    live = merger(cfg, instr.method)
    histograms = []
    for cand in instr.candidates:
        live.apply(cand)
        log_odds = live_scorer.score(data.prepared)
        histograms.append(score_histograms(log_odds, data.labels, instr.histogram))
    return histogram_reply(msg, histograms, instr.histogram.bins)


def make_client_app(overrides: Mapping[int, Mapping[str, object]] | None = None) -> ClientApp:
    """The hospital ClientApp; `overrides` (partition id -> node config) is for simulation."""
    client_app = ClientApp(mods=[secure_mod])

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_announcement(msg, context, resolve_node_config(context, overrides))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_round(msg, context, resolve_node_config(context, overrides))

    return client_app


app = make_client_app()

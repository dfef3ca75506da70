"""The hospital node as a Flower ClientApp: decode a message, check policy, reply.

Two kinds of message reach it. A QUERY carries the coordinator's announcement; the site checks
its policy and answers with its name or an error reply that says why it refuses. A TRAIN
message is one SecAgg+ round: the mod runs the key exchange and, at the masked-vector stage,
calls `handle_round`, which re-checks the policy and has `client.task` score every candidate;
the concatenated histograms are the one vector SecAgg+ masks. Nothing else leaves the site:
empty metrics and a constant example count. The work itself lives in `client.task`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp

from client.node_config import NodeConfig, parse_node_config, simulated_node_config
from common.errors import FedmergeError
from common.protocol import (
    INSTRUCTIONS_KEY,
    RECORD_NAME,
    REFUSAL_CODE,
    REPLY_KEY,
    Announcement,
    PolicyReply,
    Refusal,
    RoundInstructions,
)

ParentsFn = Callable[[], tuple[Path, Path]]

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


def handle_announcement(msg: Message, context: Context, cfg: NodeConfig) -> Message:
    """Policy check before any SecAgg+ round; accept with the site's name or refuse."""
    from client.task import check_announcement

    site = cfg.site or "site"
    try:
        ann = Announcement.model_validate_json(
            str(msg.content.config_records[RECORD_NAME][INSTRUCTIONS_KEY])
        )
        site, reason = check_announcement(cfg, ann)
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
    """Re-check the policy, score every candidate, return the histograms as one vector."""
    from client.task import check_round, score_candidates

    instr = read_instructions(msg)
    accepted = context.state.config_records.get(ACCEPTED_RECORD)
    site = str(accepted["site"]) if accepted is not None else (cfg.site or "site")
    if cfg.test_fault == "drop":
        raise RuntimeError(f"{site}: injected fault (test-fault=drop)")
    reason = check_round(
        cfg,
        instr,
        accepted_recipe=str(accepted["recipe"]) if accepted is not None else None,
        sites_in_round=_sites_in_round(context, instr.sites),
    )
    if reason:
        raise PolicyRefused(Refusal(site=site, reason=reason).to_reason())
    histograms = score_candidates(cfg, instr)
    return histogram_reply(msg, histograms, instr.histogram.bins)


def make_client_app(
    overrides: Mapping[int, Mapping[str, object]] | None = None,
    default_parents: ParentsFn | None = None,
) -> ClientApp:
    """The hospital ClientApp. `overrides` (partition id -> node config) is for simulation;
    `default_parents` supplies parents when a `flwr run` simulation's run config has none."""
    client_app = ClientApp(mods=[secure_mod])

    def node(context: Context) -> NodeConfig:
        return resolve_node_config(context, overrides, default_parents)

    @client_app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_announcement(msg, context, node(context))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_round(msg, context, node(context))

    return client_app


app = make_client_app()

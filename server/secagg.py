"""One SecAgg+ round of histogram sums over sites that have already scored.

Flower's SecAggPlusWorkflow is driven directly, one call per search round, instead of through
`DefaultWorkflow`: the number of rounds depends on the search, and nothing here needs initial
parameters or an evaluation phase. Scoring is finished before this round starts (see
`server.scoring_round`), so every stage only moves keys, shares and masked vectors and has a
short timeout. Two things are changed in Flower 1.41's workflow (`_SurvivorsWorkflow`):
- after setup and after key sharing, the protocol continues with the survivors only. Flower
  lists a site lost in those stages as "dead" at unmasking, where no site holds its shares,
  so a single early dropout halted every round (and made each site raise `KeyError`);
- shares and threshold are passed as counts the sites' guards accept (a strict majority,
  at least `min_sites`), never as fractions Flower rounds on its own.
The workflow logs "Secure aggregation halted" and returns quietly when too few sites
survive; `secure_round` turns that, and any exception of the workflow, into one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.errors import RunStopped
from common.protocol import Refusal, RoundInstructions
from common.secure_sum import SITE_WEIGHT, ExactSumSettings, decode_sum
from server.grid import CoordinatorGrid
from server.recipe import SecAggSettings


@dataclass
class RoundOutcome:
    """Summed histograms per candidate, and who contributed or failed."""

    histograms: list
    contributors: list[int]
    failures: dict[int, str] = field(default_factory=dict)  # node id -> raw error reason


def _failures_for_round(grid: CoordinatorGrid, start: int, group_id: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for msg in grid.received[start:]:
        if msg.metadata.group_id == group_id and msg.has_error():
            out[msg.metadata.src_node_id] = msg.error.reason or ""
    return out


def describe_error(reason: str | None) -> str:
    refusal = Refusal.from_reason(reason)
    if refusal is not None:
        return f"{refusal.site}: {refusal.reason}"
    return (reason or "no reason given").strip()


def _survivors_workflow_class():
    from flwr.server.workflow import SecAggPlusWorkflow

    class _SurvivorsWorkflow(SecAggPlusWorkflow):
        """Continues with the sites that answered setup and key sharing (see the module)."""

        @staticmethod
        def _keep_survivors(state) -> None:
            keep = set(state.active_node_ids)
            state.sampled_node_ids = keep
            state.nid_to_neighbours = {
                n: nb & keep for n, nb in state.nid_to_neighbours.items() if n in keep
            }

        def setup_stage(self, grid, context, state) -> bool:
            if not super().setup_stage(grid, context, state):
                return False
            self._keep_survivors(state)
            return self._check_threshold(state)

        def share_keys_stage(self, grid, context, state) -> bool:
            if not super().share_keys_stage(grid, context, state):
                return False
            self._keep_survivors(state)
            return self._check_threshold(state)

    return _SurvivorsWorkflow


def secure_round(
    grid: CoordinatorGrid,
    context: Context,
    *,
    node_ids: list[int],
    instructions: RoundInstructions,
    settings: SecAggSettings,
    exact: ExactSumSettings | None = None,
    min_sites: int = 3,
) -> RoundOutcome:
    """Run one SecAgg+ round over `node_ids`; return the exact summed histograms."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from common.protocol import instructions_digest
    from common.secure_masks import bound_to, install
    from server.strategy import HistogramSumStrategy

    install()
    exact = exact or ExactSumSettings()
    exact.check_sites(len(node_ids))
    where = f"round {instructions.round} ({instructions.stage})"
    if len(node_ids) < min_sites:
        raise RunStopped(
            f"{where}: {len(node_ids)} sites ready for secure aggregation, the recipe needs "
            f"min_sites={min_sites}", cause="too-few-sites",
        )
    shares = settings.shares_for(len(node_ids))
    threshold = settings.threshold_for(len(node_ids), min_sites)
    strategy = HistogramSumStrategy(grid, node_ids, instructions)
    # A private state: the workflow writes its aggregate there, not into the app's context.
    round_ctx = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=RecordDict(),
        run_config=context.run_config,
    )
    legacy = LegacyContext(round_ctx, config=ServerConfig(num_rounds=1), strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: instructions.round}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _survivors_workflow_class()(
        # As the exact fraction: Flower refuses an integer threshold equal to an integer
        # share count, which is what a 3-site round with min_sites=3 must use.
        num_shares=shares / len(node_ids),
        reconstruction_threshold=threshold,
        max_weight=float(SITE_WEIGHT),
        clipping_range=exact.clipping_range,
        quantization_range=exact.quantization_range,
        modulus_range=exact.modulus_range,
        timeout=settings.timeout,
    )
    start = len(grid.received)
    grid.message_ttl = settings.timeout + 30.0  # a stage no one waits for anymore expires
    try:
        # Masks bound to these instructions, as each site binds the ones it was sent
        # (`common.secure_masks.bound_to`): a site told other terms does not sum.
        with bound_to(bytes.fromhex(instructions_digest(instructions))):
            workflow(grid, legacy)
    except Exception as exc:  # Flower's own checks on replies a site or attacker malformed
        raise RunStopped(
            f"{where}: secure aggregation failed ({type(exc).__name__} in Flower's SecAgg+ "
            "workflow); no result for this round", cause="secure-aggregation-error",
        ) from None
    finally:
        grid.message_ttl = None
    failures = _failures_for_round(grid, start, str(instructions.round))
    answered = {
        m.metadata.src_node_id
        for m in grid.received[start:]
        if m.metadata.group_id == str(instructions.round) and not m.has_error()
    }
    if strategy.aggregate is None:
        silent = [n for n in node_ids if n not in answered and n not in failures]
        detail = "; ".join(f"node {n}: {describe_error(r)}" for n, r in failures.items())
        if silent:
            detail += (
                "; " if detail else ""
            ) + f"no answer within {settings.timeout:g} s from nodes {silent}"
        raise RunStopped(
            f"{where}: secure aggregation halted, too few of the {len(node_ids)} sites "
            f"completed it (reconstruction threshold {threshold}); "
            f"{detail or 'no reason reported'}",
            cause="too-few-sites", nodes=[*failures, *silent],
        )
    histograms = decode_sum(
        strategy.aggregate,
        len(strategy.result_node_ids),
        len(instructions.candidates),
        instructions.histogram.bins,
        noisy=instructions.privacy.on,
        max_count=exact.max_count,
    )
    return RoundOutcome(histograms, sorted(strategy.result_node_ids), failures)

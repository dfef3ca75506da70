"""One SecAgg+ round of histogram sums over the sites the coordinator chose.

Flower's SecAggPlusWorkflow is driven directly, one call per search round, instead of through
`DefaultWorkflow`: the number of rounds depends on the search, and nothing here needs initial
parameters or an evaluation phase. The workflow logs "Secure aggregation halted" and returns
quietly when too few sites survive; `secure_round` turns that into a FedmergeError naming the
sites that failed and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from common.errors import FedmergeError
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


def secure_round(
    grid: CoordinatorGrid,
    context: Context,
    *,
    node_ids: list[int],
    instructions: RoundInstructions,
    settings: SecAggSettings,
    exact: ExactSumSettings | None = None,
) -> RoundOutcome:
    """Run one SecAgg+ round over `node_ids`; return the exact summed histograms."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    from common.secure_masks import install
    from server.strategy import HistogramSumStrategy

    install()
    exact = exact or ExactSumSettings()
    exact.check_sites(len(node_ids))
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
    workflow = SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=float(SITE_WEIGHT),
        clipping_range=exact.clipping_range,
        quantization_range=exact.quantization_range,
        modulus_range=exact.modulus_range,
        timeout=settings.timeout,
    )
    start = len(grid.received)
    workflow(grid, legacy)
    failures = _failures_for_round(grid, start, str(instructions.round))
    answered = {
        m.metadata.src_node_id
        for m in grid.received[start:]
        if m.metadata.group_id == str(instructions.round) and not m.has_error()
    }
    if strategy.aggregate is None:
        silent = [n for n in node_ids if n not in answered and n not in failures]
        threshold = settings.threshold_for(len(node_ids))
        detail = "; ".join(f"node {n}: {describe_error(r)}" for n, r in failures.items())
        if silent:
            detail += (
                "; " if detail else ""
            ) + f"no answer within {settings.timeout:g} s from nodes {silent}"
        raise FedmergeError(
            f"round {instructions.round} ({instructions.stage}): secure aggregation halted, too "
            f"few of the {len(node_ids)} sites completed it (reconstruction threshold "
            f"{threshold}); {detail or 'no reason reported'}"
        )
    histograms = decode_sum(
        strategy.aggregate,
        len(strategy.result_node_ids),
        len(instructions.candidates),
        instructions.histogram.bins,
    )
    return RoundOutcome(histograms, sorted(strategy.result_node_ids), failures)

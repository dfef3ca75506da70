"""The coordinator's run: announce, search λ on the tuning fold, confirm on the held-out fold.

1. Announcement (a plain QUERY): every node checks its policy against the recipe and either
   accepts, naming itself, or refuses with a reason. Too few acceptances stop the run here.
2. Search rounds (SecAgg+): candidates proposed by the search strategy are scored by every
   accepting site on fold `tune_fold`; only the summed histograms come back, from which the
   pooled AUROC/AUPRC per candidate follow.
3. Test round (SecAgg+): λ*, parent A (λ = 0) and parent B (λ = 1) on fold `test_fold`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from common.errors import FedmergeError
from common.protocol import (
    INSTRUCTIONS_KEY,
    RECORD_NAME,
    REPLY_KEY,
    Candidate,
    PolicyReply,
    Refusal,
    candidate_key,
)
from server.grid import CoordinatorGrid
from server.recipe import TuningRecipe
from server.search import Evaluation, best_of, make_search, run_search
from server.secagg import describe_error, secure_round

EventFn = Callable[..., None]


@dataclass
class CandidateResult:
    """Pooled figures for one candidate on one fold, and the sites that were summed."""

    candidate: Candidate
    metrics: object  # common.metrics.PooledMetrics
    histograms: tuple  # (positives, negatives) int64 arrays
    round: int
    sites: list[str]


@dataclass
class TuningOutcome:
    recipe: TuningRecipe
    lambda_star: Candidate
    tune: list[CandidateResult]
    test: dict[str, CandidateResult]
    accepted_sites: list[str]
    contributing_sites: list[str]
    refusals: list[dict[str, str]] = field(default_factory=list)
    dropouts: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)


def wait_for_nodes(grid, expected: int, wait_s: float) -> list[int]:
    """Node ids once `expected` nodes are connected, or whatever is there after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= deadline:
            return ids
        time.sleep(0.2)


def _announce(grid: CoordinatorGrid, recipe: TuningRecipe, node_ids: list[int]):
    ann = recipe.announcement(sites=len(node_ids))
    content = RecordDict({RECORD_NAME: ConfigRecord({INSTRUCTIONS_KEY: ann.model_dump_json()})})
    msgs = [
        Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY, group_id="policy")
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(msgs, timeout=recipe.secagg.timeout))
    accepted: dict[int, str] = {}
    refusals: list[dict[str, str]] = []
    for r in replies:
        nid = r.metadata.src_node_id
        if r.has_error():
            refusal = Refusal.from_reason(r.error.reason)
            site = refusal.site if refusal else f"node-{nid}"
            reason = refusal.reason if refusal else describe_error(r.error.reason)
            refusals.append({"site": site, "stage": "announcement", "reason": reason})
        else:
            reply = PolicyReply.model_validate_json(
                str(r.content.config_records[RECORD_NAME][REPLY_KEY])
            )
            accepted[nid] = reply.site
    answered = {r.metadata.src_node_id for r in replies}
    for nid in node_ids:
        if nid not in answered:
            refusals.append(
                {
                    "site": f"node-{nid}",
                    "stage": "announcement",
                    "reason": f"no answer within {recipe.secagg.timeout:g} s",
                }
            )
    return accepted, refusals


def run_tuning(
    grid,
    context: Context,
    recipe: TuningRecipe,
    *,
    expected_sites: int | None = None,
    wait_s: float = 60.0,
    on_event: EventFn | None = None,
) -> TuningOutcome:
    """The whole federated tuning run; raises FedmergeError with a clear message on failure."""
    from common.metrics import pooled_metrics

    emit = on_event or (lambda *a, **k: None)
    grid = grid if isinstance(grid, CoordinatorGrid) else CoordinatorGrid(grid)
    recipe = recipe.with_fingerprints()
    node_ids = wait_for_nodes(grid, expected_sites or recipe.min_sites, wait_s)
    emit("nodes", count=len(node_ids))
    accepted, refusals = _announce(grid, recipe, node_ids)
    emit("announced", accepted=sorted(accepted.values()), refusals=refusals)
    if len(accepted) < recipe.min_sites:
        why = "; ".join(f"{r['site']}: {r['reason']}" for r in refusals) or "no refusals"
        raise FedmergeError(
            f"announcement: {len(accepted)} of {len(node_ids)} sites accepted, the recipe needs "
            f"min_sites={recipe.min_sites} ({why})"
        )
    site_ids = sorted(accepted)
    rounds: list[dict] = []
    results: dict[tuple, CandidateResult] = {}
    contributing: set[str] = set()
    dropouts: list[dict] = []

    def do_round(candidates: list[Candidate], rnd: int, stage: str):
        instr = recipe.round_instructions(
            round=rnd, stage=stage, candidates=candidates, sites=len(site_ids)
        )
        emit("round_start", round=rnd, stage=stage, candidates=candidates)
        started = time.perf_counter()
        outcome = secure_round(
            grid, context, node_ids=site_ids, instructions=instr, settings=recipe.secagg
        )
        sites = sorted(accepted[n] for n in outcome.contributors)
        contributing.update(sites)
        for nid, raw in outcome.failures.items():
            refusal = Refusal.from_reason(raw)
            site = accepted.get(nid, f"node-{nid}")
            if refusal is not None:
                refusals.append({"site": site, "stage": f"round {rnd}", "reason": refusal.reason})
            else:
                dropouts.append({"site": site, "round": rnd, "reason": describe_error(raw)})
        rounds.append(
            {
                "round": rnd,
                "stage": stage,
                "fold": instr.fold,
                "candidates": candidates,
                "sites": sites,
                "failed": sorted(accepted.get(n, f"node-{n}") for n in outcome.failures),
                # Wall time of the whole SecAgg+ round (all stages), for operators' planning.
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        out = []
        for cand, (pos, neg) in zip(candidates, outcome.histograms, strict=True):
            res = CandidateResult(cand, pooled_metrics(pos, neg), (pos, neg), rnd, sites)
            out.append(res)
        emit("round_end", round=rnd, stage=stage, results=out)
        return out

    round_no = 0

    def evaluate(candidates: list[Candidate], _rnd: int):
        nonlocal round_no
        round_no += 1
        out = do_round(candidates, round_no, "tune")
        for r in out:
            results[candidate_key(r.candidate)] = r
        return [r.metrics for r in out]

    search = make_search(recipe.search, recipe.groups)
    history: list[Evaluation] = run_search(search, evaluate, recipe.search.max_candidates_per_round)
    if all(e.metrics.auroc is None for e in history):
        raise FedmergeError(
            "tuning fold: the pooled data has a single class, so AUROC is undefined; expected "
            "both outcomes among the contributing sites"
        )
    star = best_of(history).candidate
    test_cands: list[Candidate] = []
    for c in (star, recipe.parent_candidate(0), recipe.parent_candidate(1)):
        if candidate_key(c) not in {candidate_key(t) for t in test_cands}:
            test_cands.append(c)
    round_no += 1
    test_out = {
        candidate_key(r.candidate): r
        for r in do_round(test_cands, round_no, "test")
    }
    test = {
        "lambda_star": test_out[candidate_key(star)],
        "parent_a": test_out[candidate_key(recipe.parent_candidate(0))],
        "parent_b": test_out[candidate_key(recipe.parent_candidate(1))],
    }
    tune = sorted(results.values(), key=lambda r: candidate_key(r.candidate))
    return TuningOutcome(
        recipe=recipe,
        lambda_star=star,
        tune=tune,
        test=test,
        accepted_sites=sorted(accepted.values()),
        contributing_sites=sorted(contributing),
        refusals=refusals,
        dropouts=dropouts,
        rounds=rounds,
    )

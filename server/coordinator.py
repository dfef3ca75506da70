"""The coordinator's run: announce, search λ on the tuning fold, confirm on the held-out fold.

1. Announcement (a plain QUERY): every node checks its policy against the recipe and either
   accepts, naming itself, or refuses with a reason. Too few acceptances stop the run here.
2. Search rounds: candidates proposed by the search strategy are scored by every taking-part
   site on fold `tune_fold` (`server.scoring_round`: one candidate per request, as long as
   the model needs, the histograms kept at the site); then one SecAgg+ exchange over the
   sites that finished (`server.secagg`) returns only the summed histograms, from which the
   pooled AUROC/AUPRC per candidate follow.
3. Test round (the same two steps): λ*, parent A (λ = 0) and parent B (λ = 1) on `test_fold`.

A site that fails, refuses or runs out of time in any step leaves the run (it is reported
and never asked again); a round goes on while at least `min_sites` sites remain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from common.errors import RunStopped
from common.protocol import (
    FAILURE_PREFIX,
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
from server.scoring_round import score_round
from server.search import Evaluation, best_within_noise, make_search, run_search
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
    privacy: dict = field(default_factory=dict)


def _reason_of(raw: str | None) -> str:
    """The code a site gave, without repeating its name; else the raw error, shortened."""
    refusal = Refusal.from_reason(raw)
    return refusal.reason if refusal is not None else describe_error(raw)


def with_site_names(message: str, missing: list[int], site_of: Callable[[int], str]) -> str:
    names = ", ".join(sorted(site_of(n) for n in missing))
    return f"{message}; sites missing: {names or 'none named'}"


def wait_for_nodes(grid, expected: int, wait_s: float) -> list[int]:
    """Node ids once `expected` nodes are connected, or whatever is there after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= deadline:
            return ids
        time.sleep(0.2)


def privacy_summary(recipe: TuningRecipe, announced_sites: int) -> dict:
    """What the report states about differential privacy: mode, (ε, δ) per run and the noise.

    The guarantee is per patient for the whole run (every candidate and round composed);
    each site also charges it to its own budget in its release ledger.
    """
    terms = recipe.privacy_terms(announced_sites)
    out: dict = {"mode": terms.mode}
    if not terms.on:
        out["note"] = "off: exact sums (each sum still hides single sites via SecAgg+)"
        return out
    from common.dp.accounting import calibrate

    cal = calibrate(terms)
    out.update(
        epsilon=round(cal.epsilon, 6),
        epsilon_target=terms.epsilon,
        delta=terms.delta,
        releases_per_fold=terms.releases,
        honest_sites=terms.honest_sites,
        sigma_site=round(cal.sigma_site, 6),
        sigma_sum=round(cal.sigma_total, 6),
        rho_run=round(cal.rho_run, 8),
        accountant=cal.accountant,
        epsilon_zcdp=round(cal.epsilon_zcdp, 6),
        neighbouring="one patient added or removed at one site",
        sensitivity="1 count in each candidate's histograms (L2 = L1 = 1 per release)",
        mechanism=("discrete Gaussian (OpenDP sampler); every release composed with "
                   "dp-accounting's privacy loss distributions (zCDP bound beside it)"),
    )
    return out


def noise_variance(instr, summed_sites: int) -> float:
    """Variance per count of the noise in a sum of `summed_sites` sites (0 when off)."""
    if not instr.privacy.on:
        return 0.0
    from common.dp.accounting import calibrate

    cal = calibrate(instr.privacy)
    return cal.noise_variance(summed_sites)


def announce(grid: CoordinatorGrid, recipe: TuningRecipe, node_ids: list[int]):
    ann = recipe.announcement(sites=len(node_ids))
    content = RecordDict({RECORD_NAME: ConfigRecord({INSTRUCTIONS_KEY: ann.model_dump_json()})})
    msgs = [
        Message(content=content, dst_node_id=nid, message_type=MessageType.QUERY, group_id="policy")
        for nid in node_ids
    ]
    # Hashing and loading the parents happen here: at least two minutes, more for big ones.
    timeout = max(recipe.secagg.timeout, 2 * recipe.scoring_timeout(), 120.0)
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
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
                    "reason": f"no answer within {timeout:g} s",
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
    from common.metrics import noisy_round_metrics, pooled_metrics

    emit = on_event or (lambda *a, **k: None)
    grid = grid if isinstance(grid, CoordinatorGrid) else CoordinatorGrid(grid)
    recipe = recipe.with_fingerprints()
    node_ids = wait_for_nodes(grid, expected_sites or recipe.min_sites, wait_s)
    emit("nodes", count=len(node_ids))
    accepted, refusals = announce(grid, recipe, node_ids)
    emit("announced", accepted=sorted(accepted.values()), refusals=refusals, nodes=accepted)
    if len(accepted) < recipe.min_sites:
        why = "; ".join(f"{r['site']}: {r['reason']}" for r in refusals) or "no refusals"
        raise RunStopped(
            f"announcement: {len(accepted)} of {len(node_ids)} sites accepted, the recipe needs "
            f"min_sites={recipe.min_sites} ({why})", cause="too-few-sites",
            nodes=[n for n in node_ids if n not in accepted],
        )
    live = sorted(accepted)  # the sites still taking part
    score_timeout = recipe.scoring_timeout()
    rounds: list[dict] = []
    results: dict[tuple, CandidateResult] = {}
    contributing: set[str] = set()
    dropouts: list[dict] = []

    def site_of(nid: int) -> str:
        return accepted.get(nid, f"node-{nid}")

    def lose(nid: int, rnd: int, raw: str | None = None, reason: str | None = None) -> None:
        """Record why a site left the run; it is never asked again."""
        refusal = Refusal.from_reason(raw) if raw is not None else None
        if refusal is not None and refusal.reason.startswith(FAILURE_PREFIX):
            reason = refusal.reason  # the site failed (a code): a dropout, not a refusal
            refusal = None
        if refusal is not None:
            refusals.append(
                {"site": site_of(nid), "stage": f"round {rnd}", "reason": refusal.reason}
            )
        else:
            why = reason if reason is not None else describe_error(raw)
            dropouts.append({"site": site_of(nid), "round": rnd, "reason": why})
        emit("site_lost", round=rnd, site=site_of(nid), refusals=refusals, dropouts=dropouts)
        if nid in live:
            live.remove(nid)

    def do_round(candidates: list[Candidate], rnd: int, stage: str):
        instr = recipe.round_instructions(
            round=rnd, stage=stage, candidates=candidates, sites=len(live),
            announced_sites=len(node_ids),
        )
        where = f"round {rnd} ({stage})"
        emit("round_start", round=rnd, stage=stage, candidates=candidates)
        started = time.perf_counter()
        asked = list(live)
        scored = score_round(
            grid, asked, instr, timeout_per_candidate=score_timeout,
            on_progress=lambda nid, done, total: emit(
                "score_progress", round=rnd, stage=stage, site=site_of(nid), done=done,
                total=total,
            ),
        )
        scoring_s = time.perf_counter() - started
        for nid, raw in scored.failed.items():
            lose(nid, rnd, raw)
        for nid, done in scored.slow.items():
            lose(nid, rnd, reason=(
                f"still scoring after {score_timeout:g} s per candidate "
                f"({done} of {len(candidates)} done)"
            ))
        if len(scored.ready) < recipe.min_sites:
            slow = ", ".join(
                f"{site_of(n)} ({d}/{len(candidates)})" for n, d in scored.slow.items()
            )
            failed = ", ".join(
                f"{site_of(n)} ({_reason_of(r)})" for n, r in scored.failed.items()
            )
            detail = "; ".join(
                x for x in (slow and f"still scoring: {slow}", failed and f"failed: {failed}") if x
            )
            hint = (
                f"; raise score_timeout in the recipe (now {score_timeout:g} s per candidate; "
                "--timeout on fedmerge simulate)" if scored.slow else ""
            )
            raise RunStopped(
                f"{where}: {len(scored.ready)} of {len(asked)} sites finished scoring, the recipe "
                f"needs min_sites={recipe.min_sites} ({detail or 'no answers'}){hint}",
                cause="too-few-sites", nodes=[n for n in asked if n not in scored.ready],
            )
        emit("secagg_start", round=rnd, stage=stage, sites=len(scored.ready))
        secagg_started = time.perf_counter()
        # Distributed noise is enough only in a sum of the sites it assumes honest.
        floor = recipe.min_sites
        if instr.privacy.mode == "distributed":
            floor = max(floor, instr.privacy.honest_sites)
        try:
            outcome = secure_round(
                grid, context, node_ids=scored.ready, instructions=instr,
                settings=recipe.secagg, min_sites=floor,
            )
        except RunStopped as exc:  # it names nodes by id: name the sites too
            missing = [n for n in exc.nodes if n in scored.ready]
            emit("secagg_failed", round=rnd, missing=sorted(site_of(n) for n in missing))
            raise RunStopped(with_site_names(str(exc), missing, site_of), cause=exc.cause,
                             nodes=missing) from None
        for nid, raw in outcome.failures.items():
            lose(nid, rnd, raw)
        sites = sorted(site_of(n) for n in outcome.contributors)
        contributing.update(sites)
        rounds.append(
            {
                "round": rnd,
                "stage": stage,
                "fold": instr.fold,
                "candidates": candidates,
                "sites": sites,
                "failed": sorted(
                    site_of(n) for n in {*scored.failed, *scored.slow, *outcome.failures}
                ),
                # Wall times, for operators' planning: the whole round, and its two steps.
                "seconds": round(time.perf_counter() - started, 3),
                "scoring_seconds": round(scoring_s, 3),
                "secagg_seconds": round(time.perf_counter() - secagg_started, 3),
            }
        )
        out = []
        variance = noise_variance(instr, len(outcome.contributors))
        # With noise, the round's candidates share their class totals (the same patients).
        all_metrics = (noisy_round_metrics(outcome.histograms, variance) if variance
                       else [pooled_metrics(pos, neg) for pos, neg in outcome.histograms])
        for cand, (pos, neg), metrics in zip(candidates, outcome.histograms, all_metrics,
                                             strict=True):
            out.append(CandidateResult(cand, metrics, (pos, neg), rnd, sites))
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
        raise RunStopped(
            "tuning fold: the pooled data has a single class, so AUROC is undefined; expected "
            "both outcomes among the contributing sites", cause="single-class",
        )
    # Without noise the best AUROC; with noise the best of the λ-smoothed curve (search.py).
    star = best_within_noise(history).candidate
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
        privacy=privacy_summary(recipe, len(node_ids)),
    )

"""A hospital's work for one request, with no Flower in sight: policy checks and scoring.

Why apart from the ClientApp: "these λ on this fold → these histograms" is the whole job of a
site, and it must be runnable and testable by itself (a bench, a dry run, a test) without
building Flower messages. `client_app.py` only decodes messages, calls these functions and
wraps what they return.

Where a λ travels here: `score_one` → `node_cache.merger(...).apply(λ)` (the in-place
switch) → `YesNoScorer.score` (log-odds per stay) → `score_histograms` (the site's counts).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from client import policy
from client.node_config import NodeConfig
from common.protocol import Announcement, RoundInstructions

Histograms = list[tuple[np.ndarray, np.ndarray]]


def own_fingerprints(cfg: NodeConfig) -> tuple[str, str]:
    """SHA-256 of this site's own copies of the parents (cached per process)."""
    from client.node_cache import parent_fingerprint

    return parent_fingerprint(cfg.parent_a), parent_fingerprint(cfg.parent_b)


def check_announcement(cfg: NodeConfig, ann: Announcement) -> tuple[str, str | None]:
    """(this site's public name, the first rule the announcement breaks or None)."""
    from client.node_cache import fold_counts, site_records

    site, _ = site_records(cfg, ann.scoring.hard)

    def counts():
        return {
            f: fold_counts(cfg, f, ann.folds, ann.fold_seed, ann.scoring.hard)
            for f in ann.score_folds
        }

    reason = policy.check_announcement(cfg.policy, ann, own_fingerprints(cfg), counts)
    if reason is None:
        reason = check_budget(cfg, ann)
    if reason is None:
        # Load both parents now, inside the announcement's generous timeout: a node that
        # cannot hold them says so before any round, and no round pays for the loading.
        from client.node_cache import merger

        merger(cfg, ann.method)
    return site, reason


def check_budget(cfg: NodeConfig, ann: Announcement) -> str | None:
    """Refuse a private run whose full cost (every announced release of one fold) would take
    this site past its total budget in the ledger, before anything is scored."""
    if not ann.privacy.on or cfg.ledger is None:
        return None
    from client.ledger import ReleaseLedger
    from common.dp.accounting import calibrate

    cal = calibrate(ann.privacy)
    budget = (cfg.policy.privacy.max_epsilon_total, cfg.policy.privacy.max_delta)
    if ReleaseLedger(cfg.ledger).charge_would_exceed(cal.charges(ann.privacy.releases),
                                                     budget):
        return "dp:budget-exhausted"
    return None


def check_round(
    cfg: NodeConfig,
    instr: RoundInstructions,
    *,
    accepted: Announcement | None,
    rounds_so_far: int,
) -> str | None:
    """The first rule this round breaks, or None. The round is held to the announcement the
    site accepted (a coordinator may change its mind, or send each site something else),
    then re-checked against the policy on the fold it names."""
    from client.node_cache import fold_counts

    if accepted is None:
        return "round:differs-from-announcement"
    if rounds_so_far >= cfg.policy.max_rounds:
        return "policy:max-rounds"
    # The terms first: a fold the site never accepted (one past the fold count, say) is a
    # refusal under a rule, not a failure to count it.
    differs = policy.check_round_terms(accepted, instr)
    if differs:
        return differs
    counts = {
        instr.fold: fold_counts(cfg, instr.fold, instr.folds, instr.fold_seed, instr.scoring.hard)
    }
    return policy.first_refusal(
        policy.check_sites(cfg.policy, instr.sites),
        policy.check_candidates(cfg.policy, instr.candidates),
        policy.check_parents(own_fingerprints(cfg), instr.parent_fingerprints),
        policy.check_cohort(cfg.policy, counts),
    )


def score_one(
    cfg: NodeConfig, instr: RoundInstructions, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(positives, negatives) histograms of candidate `index` on the round's fold."""
    from client.node_cache import fold_data, merger
    from common.metrics import score_histograms

    live_scorer, data = fold_data(
        cfg, instr.method, instr.scoring, instr.fold, instr.folds, instr.fold_seed
    )
    merger(cfg, instr.method).apply(instr.candidates[index])
    log_odds = live_scorer.score(data.prepared)
    return score_histograms(log_odds, data.labels, instr.histogram, reference_edges(cfg, instr))


def reference_edges(cfg: NodeConfig, instr: RoundInstructions) -> np.ndarray | None:
    """Inner bin edges from the public reference cohort scored by the live merge (the
    candidate already applied), or None for equal-width bins."""
    spec = instr.histogram
    if not spec.uses_reference:
        return None
    from client.node_cache import reference_prepared

    ref_scorer, prepared = reference_prepared(cfg, instr.method, instr.scoring, spec.reference)
    return spec.reference_edges(ref_scorer.score(prepared), prepared.labels)


def noisy_release(histograms: Histograms, instr: RoundInstructions) -> Histograms:
    """The histograms as this site releases them: with its share of the discrete Gaussian
    noise when the run is differentially private (drawn once, at release, never redrawn:
    the round is released at most once)."""
    if not instr.privacy.on:
        return histograms
    from common.dp.accounting import calibrate
    from common.dp.noise import noisy_counts

    sigma = calibrate(instr.privacy).sigma_site
    return [(noisy_counts(p, sigma), noisy_counts(n, sigma)) for p, n in histograms]


def score_candidates(
    cfg: NodeConfig,
    instr: RoundInstructions,
    progress: Callable[[int, int], None] | None = None,
) -> Histograms:
    """(positives, negatives) histograms of every candidate, in order, on the round's fold.

    `progress(done, total)` is called after each candidate: candidates, never counts.
    """
    out: Histograms = []
    for index in range(len(instr.candidates)):
        out.append(score_one(cfg, instr, index))
        if progress is not None:
            progress(index + 1, len(instr.candidates))
    return out

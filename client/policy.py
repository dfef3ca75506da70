"""A site's rules, checked before anything is scored.

Pure functions of the request and the site's own facts, so they are tested without Flower and
the same checks run at the announcement and again for every round (a coordinator could
change its mind between the two, or send each site something else). A broken rule is
reported as a fixed code from `RULES`, never with the site's counts, a path or an exception
text: a refusal travels to the coordinator in the clear. The meaning of each code, with the
site's own limits, is written to the node's local log only.

What the coordinator may ask is bounded or pinned here, so that it cannot shape a release to
single out one site: the histogram spec is pinned (a decoy spec sent to the other sites
would otherwise leave one site's counts alone in some bins), the prompt must be an allowed
template (a free template asks any yes/no question about the records), the folds, their seed
and which of them may be scored are the site's, and sizes and round counts are capped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from client.node_config import SitePolicy
from common.metrics import HistogramSpec, default_histogram
from common.protocol import (
    GROUPS,
    REFUSAL_CODES,
    Announcement,
    Candidate,
    RecipeTerms,
    RoundInstructions,
)

RULES = REFUSAL_CODES  # every code, with its meaning (common/protocol.py)


def check_sites(policy: SitePolicy, sites: int) -> str | None:
    return "policy:min-sites" if sites < policy.min_sites else None


def check_cohort(policy: SitePolicy, counts: Mapping[int, tuple[int, int]]) -> str | None:
    """`counts`: fold -> (records, positives) of this site."""
    for _fold, (n, positives) in sorted(counts.items()):
        if n < policy.min_cohort:
            return "policy:min-cohort"
        if positives < policy.min_positives:
            return "policy:min-positives"
    return None


def check_candidates(policy: SitePolicy, candidates: Sequence[Candidate]) -> str | None:
    if len(candidates) > policy.max_candidates:
        return "policy:max-candidates"
    for cand in candidates:
        if isinstance(cand, dict) and (not cand or not set(cand) <= set(GROUPS)):
            return "policy:unknown-group"  # no group at all is no merge either
        values = cand.values() if isinstance(cand, dict) else [cand]
        if not all(0.0 <= float(v) <= 1.0 for v in values):
            return "policy:lambda-range"
    return None


def check_parents(own: tuple[str, str], announced: tuple[str, str]) -> str | None:
    return None if tuple(own) == tuple(announced) else "policy:parents-differ"


def check_count(policy: SitePolicy, per_round: int) -> str | None:
    """The announced per-round maximum must fit the site's own cap."""
    return "policy:max-candidates" if per_round > policy.max_candidates else None


def check_privacy(policy: SitePolicy, ann: Announcement) -> str | None:
    """The announced privacy against the site's: mode, (ε, δ) per run, assumed honest sites.

    In distributed mode each site adds σ/√t for the t honest sites the run claims: a larger
    claim means less noise per site, so a site accepts at most what it assumes itself, a
    strict majority of the announced sites. A smaller claim only adds noise and is accepted.
    """
    from common.dp.settings import MODE_STRENGTH

    want, got = policy.privacy, ann.privacy
    if MODE_STRENGTH[got.mode] < MODE_STRENGTH[want.min_mode]:
        return "dp:mode-below-policy"
    if not got.on:
        return None
    if got.epsilon > want.max_epsilon_per_run or got.delta > want.max_delta:
        return "dp:epsilon-above-policy"
    if got.mode == "distributed" and got.honest_sites > ann.sites // 2 + 1:
        return "dp:honest-sites-above-policy"
    return None


def check_terms(policy: SitePolicy, terms: RecipeTerms) -> str | None:
    """What every message of a run restates: method, folds and the scoring recipe."""
    if terms.method not in policy.methods:
        return "policy:method-not-allowed"
    if terms.folds != policy.folds or terms.fold_seed != policy.fold_seed:
        return "policy:folds-not-allowed"
    scoring = terms.scoring
    if scoring.template not in policy.templates:
        return "policy:template-not-allowed"
    if scoring.use_chat_template and not policy.allow_chat_template:
        return "policy:template-not-allowed"
    if (scoring.max_patient_tokens > policy.max_patient_tokens
            or scoring.batch_tokens > policy.max_batch_tokens):
        return "policy:scoring-out-of-bounds"
    return None


def pinned_histogram(policy: SitePolicy, noisy: bool) -> HistogramSpec:
    """The one spec this site releases in: its own, else the federation's default for the
    announced mode. A function of the mode only, so the coordinator still cannot aim bins
    (a decoy spec for the other sites) at one site."""
    return policy.histogram or default_histogram(noisy)


def check_announcement(
    policy: SitePolicy,
    ann: Announcement,
    own_fingerprints: tuple[str, str],
    counts: Callable[[], Mapping[int, tuple[int, int]]],
) -> str | None:
    """The first rule the announcement breaks, or None.

    `counts()` (fold -> records, positives) is called only once every rule that does not
    depend on the site's data has passed: folds and seeds outside the policy are refused
    before they are even counted, so trying them teaches the coordinator nothing of the
    site's size.
    """
    if not set(ann.score_folds) <= set(policy.score_folds):
        return "policy:fold-not-allowed"
    if ann.histogram != pinned_histogram(policy, ann.privacy.on):
        return "policy:histogram-not-allowed"
    return first_refusal(
        check_sites(policy, ann.sites),
        check_count(policy, ann.max_candidates_per_round),
        check_terms(policy, ann),
        check_privacy(policy, ann),
        check_parents(own_fingerprints, ann.parent_fingerprints),
    ) or check_cohort(policy, counts())


def check_round_terms(accepted: Announcement, instr: RoundInstructions) -> str | None:
    """A round must ask for exactly what the site accepted: the same terms, the same
    histogram spec, an announced fold, at most the announced candidates and sites."""
    shared = set(RecipeTerms.model_fields)
    if (
        accepted.model_dump(include=shared) != instr.model_dump(include=shared)
        or instr.histogram != accepted.histogram
        or instr.fold not in accepted.score_folds
        or len(instr.candidates) > accepted.max_candidates_per_round
        or instr.sites > accepted.sites
    ):
        return "round:differs-from-announcement"
    return None


def first_refusal(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)

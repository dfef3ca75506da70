"""A site's rules, checked before anything is scored.

Pure functions of the request and the site's own facts, so they are tested without Flower and
the same checks run at the announcement and again inside every SecAgg+ round (a coordinator
could change its mind between the two). Reasons name the rule but never the site's own counts:
a refusal travels in the clear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from client.node_config import SitePolicy
from common.protocol import GROUPS, Candidate


def check_sites(policy: SitePolicy, sites: int) -> str | None:
    if sites < policy.min_sites:
        return (
            f"too few sites in the round: {sites}, this site requires at least {policy.min_sites}"
        )
    return None


def check_cohort(policy: SitePolicy, counts: Mapping[int, tuple[int, int]]) -> str | None:
    """`counts`: fold -> (records, positives) of this site."""
    for fold, (n, positives) in sorted(counts.items()):
        if n < policy.min_cohort:
            return f"cohort of fold {fold} is below this site's minimum of {policy.min_cohort}"
        if positives < policy.min_positives:
            return (
                f"positives in fold {fold} are below this site's minimum of {policy.min_positives}"
            )
    return None


def check_candidates(policy: SitePolicy, candidates: Sequence[Candidate]) -> str | None:
    if len(candidates) > policy.max_candidates:
        return (
            f"too many candidates: {len(candidates)} in one round, this site allows at most "
            f"{policy.max_candidates}"
        )
    for cand in candidates:
        values = cand.values() if isinstance(cand, dict) else [cand]
        if isinstance(cand, dict) and not set(cand) <= set(GROUPS):
            return f"candidate {cand} names unknown groups; expected {', '.join(GROUPS)}"
        for v in values:
            if not (0.0 <= float(v) <= 1.0):
                return f"candidate {cand} is outside [0, 1]"
    return None


def check_parents(own: tuple[str, str], announced: tuple[str, str]) -> str | None:
    if tuple(own) != tuple(announced):
        which = [name for name, a, b in zip(("A", "B"), own, announced, strict=True) if a != b]
        return (
            f"parent {' and '.join(which)} SHA-256 differs from the announced fingerprint "
            "(all sites must score the same merges)"
        )
    return None


def first_refusal(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)


def check_count(policy: SitePolicy, per_round: int) -> str | None:
    """The announced per-round maximum must fit the site's own cap."""
    if per_round > policy.max_candidates:
        return (
            f"too many candidates: up to {per_round} per round announced, this site allows at "
            f"most {policy.max_candidates}"
        )
    return None

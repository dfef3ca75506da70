"""The wire contract: what the coordinator may ask a hospital, and how the hospital says no.

Both sides speak it, so it lives in `common/`: the coordinator builds these messages, the
hospital validates them. Everything travels as one JSON string in a ConfigRecord: pydantic
validates it on arrival, and a malformed request becomes one clear refusal instead of a
half-understood round.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.dp.settings import PrivacySettings
from common.merge.config import GROUPS
from common.metrics import HistogramSpec

# ConfigRecord keys.
INSTRUCTIONS_KEY = "fedmerge.instructions"
REPLY_KEY = "fedmerge.reply"
RECORD_NAME = "fedmerge"
# Error code of a policy refusal (distinct from Flower's own codes, which are small).
REFUSAL_CODE = 4403
REFUSAL_MARK = "fedmerge-refusal"
# Every code a site may send instead of an answer, and what it means. Only the code crosses
# to the coordinator; a site logs the meaning (with its own limits) locally.
REFUSAL_CODES = {
    "policy:min-sites": "fewer sites in the round than this site's min_sites",
    "policy:max-candidates": "more candidates per round than this site's max_candidates",
    "policy:lambda-range": "a candidate λ outside [0, 1]",
    "policy:unknown-group": "a candidate names parameter groups other than attention/mlp/other",
    "policy:parents-differ": "the announced parent SHA-256 differ from this site's copies",
    "policy:method-not-allowed": "a merge method this site does not allow",
    "policy:folds-not-allowed": "folds or fold seed other than this site's",
    "policy:fold-not-allowed": "a fold this site does not allow to be scored",
    "policy:histogram-not-allowed": "a histogram spec other than the one this site pins",
    "policy:template-not-allowed": "a prompt template this site does not allow",
    "policy:scoring-out-of-bounds": "token budgets beyond this site's bounds",
    "policy:max-rounds": "more rounds in this run than this site allows",
    "policy:announcement-rate": "more announcements in the last hour than this site answers",
    "policy:protocol-version": "a coordinator of another fedmerge protocol version",
    "policy:announcement-changed": "a second announcement in a run, other than the one this "
    "site accepted",
    "policy:min-cohort": "a fold with fewer stays than this site's min_cohort",
    "policy:min-positives": "a fold with fewer positives than this site's min_positives",
    "round:differs-from-announcement": "a round whose terms differ from what this site accepted",
    "round:not-scored": "a SecAgg+ round for instructions this site has not finished scoring",
    "round:already-released": "a second SecAgg+ round for instructions already released",
    "request:malformed": "a request that does not parse as the protocol's message",
    "score:out-of-order": "a candidate requested out of order within a round",
    "score:unexpected-progress": "(coordinator) a site's progress reply did not match",
    "secagg:not-a-secagg-message": "a train message without a SecAgg+ stage",
    "secagg:stage-out-of-order": "a SecAgg+ stage out of order",
    "secagg:stale-round": "a SecAgg+ stage of an earlier round",
    "secagg:setup-malformed": "a SecAgg+ setup without integer sites, shares and threshold",
    "secagg:too-few-sites": "a SecAgg+ setup with fewer sites than this site's min_sites",
    "secagg:threshold-below-policy": "a threshold below a strict majority or min_sites, or "
    "more shares than sites",
    "secagg:share-keys-invalid": "key sharing without this site or with too few or many sites",
    "secagg:collect-invalid": "shares forwarded from too few or unknown sites",
    "secagg:unmask-lists-a-site-twice": "an UNMASK list naming a site twice",
    "secagg:unmask-active-and-dead": "an UNMASK listing a site as both active and dead",
    "secagg:unmask-lists-this-site-dead": "an UNMASK listing this site as dead",
    "secagg:unmask-too-few-active": "an UNMASK with fewer active sites than allowed",
    "secagg:unmask-unknown-site": "an UNMASK naming sites that never shared keys here",
    "secagg:protocol-error": "a SecAgg+ message Flower's client mod rejected",
    "ledger:would-isolate": "an earlier sum of the same fold and merge over a different "
    "number of sites: the two would give a site by difference",
    "ledger:daily-cap": "more releases today than this site allows",
    "dp:mode-below-policy": "a privacy mode weaker than this site requires (off < distributed "
    "< local)",
    "dp:epsilon-above-policy": "an epsilon or delta per run above this site's cap",
    "dp:honest-sites-above-policy": "distributed noise that assumes more honest sites than a "
    "strict majority of the announced sites: too little noise per site",
    "dp:budget-exhausted": "a run whose privacy cost would exceed this site's total budget",
    "dp:releases-exhausted": "more candidate releases of one fold than the run announced",
    "dp:too-few-sites": "a distributed-noise sum over fewer sites than the run assumes honest",
    "site:data-unavailable": "the site could not load its data or parents (see its log)",
    "site:scoring-failed": "scoring failed at the site (see its log)",
    "site:handler-failed": "the site's handler failed (see its log)",
    "site:failed": "the site failed (test fault injection)",
}

# A refusal whose code starts with this says the site FAILED (it is a dropout), not that a
# rule of its policy was broken: "site:scoring-failed", "site:handler-failed", ...
FAILURE_PREFIX = "site:"
# Scoring travels as `query.score` messages, outside SecAgg+ (whose client mod only sees
# `train`); the SecAgg+ exchange then runs over vectors the sites already hold.
SCORE_MESSAGE_TYPE = "query.score"

__all__ = ["GROUPS", "Candidate", "candidate_key"]  # GROUPS: the merge engine's, re-exported
Candidate = float | dict[str, float]


class ScoringSettings(BaseModel):
    """How every site turns a record into log-odds; identical across sites by construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template: str | None = None  # None: the scorer's default (the paper's wording)
    use_chat_template: bool = False
    max_patient_tokens: int = Field(default=512, ge=8)
    batch_tokens: int = Field(default=4096, ge=64)
    hard: bool = False  # the Mortality-hard variant (numeric sections only)


# The wire protocol's version: both ends must speak the same one. 2: SecAgg+ masks bound to
# the round's instructions (`common.secure_masks.bound_to`), which version 1 did not bind.
PROTOCOL_VERSION = 2


class RecipeTerms(BaseModel):
    """What every message of a run restates, so a site can hold each round to what it accepted.

    The announcement and every round carry these fields, built from one recipe helper
    (`server.recipe.TuningRecipe.terms`), never copied field by field.
    """

    model_config = ConfigDict(frozen=True)

    # Checked first at the announcement: a site of another version refuses at once instead of
    # scoring, spending its budget and then failing to unmask with the others.
    protocol: int = PROTOCOL_VERSION
    recipe_fingerprint: str
    parent_fingerprints: tuple[str, str]
    method: Literal["slerp", "linear"]
    folds: int = Field(ge=2)
    fold_seed: int = 0
    scoring: ScoringSettings = ScoringSettings()
    # Differential privacy of every release of the run (common/dp/settings.py).
    privacy: PrivacySettings = PrivacySettings()


class Announcement(RecipeTerms):
    """The policy check sent before any round: every field a round of the run may use, so
    the site decides once, on all of it, and holds each round to exactly this."""

    sites: int = Field(ge=1)
    max_candidates_per_round: int = Field(ge=1)
    score_folds: tuple[int, ...]
    histogram: HistogramSpec = HistogramSpec()


class RoundInstructions(RecipeTerms):
    """One SecAgg+ round: score these merges on this fold and return summed histograms."""

    round: int = Field(ge=1)
    stage: Literal["tune", "test"]
    candidates: list[Candidate] = Field(min_length=1)
    fold: int = Field(ge=0)
    histogram: HistogramSpec = HistogramSpec()
    sites: int = Field(ge=1)


class ScoreRequest(BaseModel):
    """Score candidate `index` of a round and keep its histograms at the site.

    One candidate per message, in order, so that the coordinator sees how far each site has
    got (started, n of m done) and a site's scoring can take as long as its model needs
    without holding a SecAgg+ stage open.
    """

    model_config = ConfigDict(frozen=True)

    instructions: RoundInstructions
    index: int = Field(ge=0)


class ScoreProgress(BaseModel):
    """A site's answer to a ScoreRequest: how many candidates it holds, never any count."""

    model_config = ConfigDict(frozen=True)

    site: str
    round: int
    done: int
    total: int


def instructions_digest(instr: RoundInstructions) -> str:
    """SHA-256 of a round's instructions: the SecAgg+ round must ask for what was scored."""
    import hashlib

    return hashlib.sha256(instr.model_dump_json().encode()).hexdigest()


class PolicyReply(BaseModel):
    """A site's acceptance of an announcement: its public name only, no counts."""

    site: str
    accepted: bool = True


class Refusal(BaseModel):
    """Why a site declined; carried in an error reply's reason, never with a per-site number."""

    site: str
    reason: str

    def to_reason(self) -> str:
        return json.dumps({REFUSAL_MARK: True, "site": self.site, "reason": self.reason})

    @classmethod
    def from_reason(cls, reason: str | None) -> Refusal | None:
        """The refusal inside an error reason, or None when the error is something else."""
        if not reason:
            return None
        start = reason.find("{")
        if start < 0:
            return None
        try:
            data = json.loads(reason[start : reason.rfind("}") + 1])
        except ValueError:
            return None
        if not isinstance(data, dict) or not data.get(REFUSAL_MARK):
            return None
        return cls(site=str(data.get("site", "?")), reason=str(data.get("reason", "")))


def candidate_key(candidate: Candidate) -> tuple:
    """A hashable, order-independent identity for a candidate (for de-duplication)."""
    if isinstance(candidate, dict):
        return tuple(sorted((k, round(float(v), 12)) for k, v in candidate.items()))
    return (round(float(candidate), 12),)

"""The site's release ledger: every sum this site took part in, kept by the site itself.

Why: a coordinator may keep everything and re-run. Summing the same fold of the same merge once
over {A, B, C, D} and again over {A, B, C} gives D's histogram by difference, exactly, although
each sum alone hides D. No single round shows that; only a memory across rounds and runs does.
Before a site hands its vector to a SecAgg+ round it looks here for an earlier release of the
same fold, fold seed, terms (parents, scoring, histogram) and merge (`merge_identity`: the
model a candidate builds, not how it is written) summed over a DIFFERENT number of sites, and
refuses (`ledger:would-isolate`); it also caps releases per day
(`ledger:daily-cap`). How many sites a sum holds is only settled at UNMASK, after the vectors
left: a coordinator can sample the same four sites twice and drop one of them the second time
(its vector never collected, so UNMASK lists it dead). So the site writes a second line at
UNMASK, a `sum` line with the number of sites in the active list, and answers UNMASK only if
that number agrees with every earlier release and sum of the same fold, terms and candidate
(`check_sum`); with the threshold a strict majority of the sampled sites, a sum the survivors
refuse cannot be unmasked. A first sum that lost a site to a real dropout is answered; after
it, that candidate on that fold is refused for good (its release line says four, its sum line
three).

These counts are what the coordinator shows THIS site. Sites do not see one another's view of a
round, so a coordinator that forges views gets past them: it can tell each of four sites "three
sites" and arrange their shares in a ring (A-B, B-C, C-D, D-A), or collect all four vectors and
tell each site a different "three active" at UNMASK (A: A, B, C; B: B, C, D; C: C, D, A; D: D,
A, B), which still yields three mask-seed shares of every site, so the sum of all four is
unmasked while every site answered "three". Binding the views would take sites checking one
another's view of a round, which SecAgg+ (keys relayed unsigned, no site-to-site channel at
UNMASK) does not give. Without noise the ledger stops a coordinator that keeps SecAgg+'s lists
consistent, not one that forges them; noise bounds both.

Each release is appended as one JSON line, flushed and fsynced, so the ledger survives
restarts; a line torn by a crash is ignored when read (that release was not completed).
`fedmerge node ledger` shows it.

Lines written before `merge_identity` (the candidate as written, the method and batch size in
the terms) are still charged and still matched: each release also carries its old form.

What it does not stop without noise: different candidates on one fold summed over different
site sets still differ by the dropped site's stay and death counts (every histogram of a fold
has the same totals); and a coordinator that sums the same candidate over different sets of the
SAME size (four of five sites, five times, each time leaving out another) can solve for every
site's histogram. Sites do not know one another (the coordinator names them), so no site can
tell two sets of equal size apart. Differential privacy bounds all of that: a noisy release is
not refused for its site count but CHARGED here (its noise scale σ, the candidates it released,
and their zCDP ρ), and a release that would take the site past its total (ε, δ) budget is
refused (`dp:budget-exhausted`). A patient lies in one fold of each partition (folds, fold
seed), so the patient charged most is found by trying every choice of one fold per partition
and composing that choice's releases with dp-accounting's PLDs
(`common.dp.accounting.epsilon_of`, the same tight accountant a run is calibrated with, so a
site whose total cap equals its per-run cap accepts exactly one such run). With more than 64
such choices, the zCDP bound of the largest fold per partition stands in (looser, never smaller
than the truth)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import FedmergeError
from common.protocol import GROUPS, Candidate, RoundInstructions, candidate_key

DAY_S = 86_400.0


class Release(BaseModel):
    """One sum this site contributed to (no counts, no records: what was asked, and of whom)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float
    run: int
    round: int
    stage: str
    fold: int
    folds: int
    fold_seed: int
    terms: str  # SHA-256 of parents, scoring and histogram spec (`terms_digest`)
    candidates: tuple[str, ...]
    sites: int
    # zCDP cost of this release for any one patient of the fold (0: an exact, noiseless sum).
    rho: float = 0.0
    # Scale of the guaranteed noise per count, and KLS's τ of a distributed sum (per candidate).
    # Lines written before these existed: σ follows from ρ (ρ = candidates / 2σ²), τ was ~0.
    sigma: float = 0.0
    tau: float = 0.0
    # "release": this site's vector left in a SecAgg+ round (`sites`: the sites sampled);
    # "sum": that round's UNMASK, `sites` the sites whose vectors are summed (no new charge).
    kind: Literal["release", "sum"] = "release"
    # The same release in the form of lines written before `merge_identity` (terms with the
    # method and batch size, candidates as written), so that those lines still match it.
    legacy_terms: str | None = None
    legacy_candidates: tuple[str, ...] | None = None

    def charges(self):
        """This release as the accountant composes it (None for an exact sum)."""
        if self.rho <= 0:
            return None
        from common.dp.accounting import Gaussians

        count = len(self.candidates)
        if self.sigma:
            return Gaussians(self.sigma, count, self.tau)
        # A line from before σ and τ were kept: σ follows from ρ exactly (ρ = count/2σ²);
        # τ was not recorded, so it is taken at its largest for this sum: a distributed run
        # assumes at most as many honest sites as it summed, and τ grows with them.
        from common.dp.accounting import distributed_tau

        sigma = math.sqrt(count / (2.0 * self.rho))
        t = max(self.sites, 1)
        return Gaussians(sigma, count, distributed_tau(sigma / math.sqrt(t), t))


# Merges whose λ differ by at most this in every group are one merge to the ledger: their
# scores barely differ, so two sums of them over different sites would still give a site by
# difference. Compared as a distance (`same_merge`), never by rounding, which would put two
# λ a hair apart on either side of a rounding boundary.
LAMBDA_TOLERANCE = 1e-4
_TAGS = ("parents", "linear", "slerp")


def terms_digest(instr: RoundInstructions, *, legacy: bool = False) -> str:
    """SHA-256 of what shapes every score of a release but the merge itself: parents, scoring
    and histogram spec. Not the method (part of `merge_identity`, where it matters) nor
    `batch_tokens` (how many tokens go through the model at once: the same scores).
    `legacy`: the terms as lines written before `merge_identity` hold them (with both)."""
    fields = instr.model_dump(
        mode="json",
        include={"parent_fingerprints", "scoring", "histogram"} | ({"method"} if legacy else set()),
    )
    if not legacy:
        fields["scoring"].pop("batch_tokens", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def merge_identity(candidate: Candidate, method: str) -> str:
    """The model a candidate builds, as the ledger compares releases: JSON `[tag, [λ per
    group]]`, the tag the method, or "parents" where every λ is within `LAMBDA_TOLERANCE` of
    0 or 1 (each tensor is then one parent's, whatever the method; λ then written 0 or 1).

    Why not the candidate as written: a coordinator that rewords a candidate (λ + 1e-9, the
    same λ given per group, a parent under the other method) gets the same scores under a
    new name, and the ledger would let two sums over different sites through. An unnamed
    group takes the mean of the named ones, as the merge does.
    """
    if isinstance(candidate, dict):
        given = {g: float(v) for g, v in candidate.items()}
        mean = sum(given.values()) / len(given)
        values = [given.get(g, mean) for g in GROUPS]
    else:
        values = [float(candidate)] * len(GROUPS)
    ends = [round(v) for v in values]
    if all(abs(v - e) <= LAMBDA_TOLERANCE for v, e in zip(values, ends, strict=True)):
        return json.dumps(["parents", [float(e) for e in ends]])
    return json.dumps([method, [round(v, 12) + 0.0 for v in values]])


def _merge(text: str) -> tuple[str, list[float]] | None:
    """A `merge_identity` back as (tag, λ per group); None for a line written before it."""
    try:
        tag, values = json.loads(text)
    except (ValueError, TypeError):
        return None
    if tag not in _TAGS or not isinstance(values, list) or len(values) != len(GROUPS):
        return None
    return tag, [float(v) for v in values]


def _close(first: tuple[str, list[float]], second: tuple[str, list[float]]) -> bool:
    return first[0] == second[0] and all(
        abs(x - y) <= LAMBDA_TOLERANCE for x, y in zip(first[1], second[1], strict=True))


def same_merge(a: str, b: str) -> bool:
    """Whether two `merge_identity` texts name one merge (within `LAMBDA_TOLERANCE`)."""
    first, second = _merge(a), _merge(b)
    if first is None or second is None:
        return a == b
    return _close(first, second)


def release_of(instr: RoundInstructions, *, run: int, sites: int, now: float | None = None
               ) -> Release:
    noise: dict = {}
    if instr.privacy.on:
        from common.dp.accounting import calibrate

        cal = calibrate(instr.privacy)
        noise = dict(rho=len(instr.candidates) * cal.rho_release, sigma=cal.sigma_total,
                     tau=cal.tau_release)
    return Release(
        **noise,
        time=time.time() if now is None else now,
        run=run,
        round=instr.round,
        stage=instr.stage,
        fold=instr.fold,
        folds=instr.folds,
        fold_seed=instr.fold_seed,
        terms=terms_digest(instr),
        candidates=tuple(merge_identity(c, instr.method) for c in instr.candidates),
        legacy_terms=terms_digest(instr, legacy=True),
        legacy_candidates=tuple(json.dumps(candidate_key(c)) for c in instr.candidates),
        sites=sites,
    )


class ReleaseLedger:
    """An append-only JSON-lines file of this site's releases."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def entries(self) -> list[Release]:
        if not self.path.is_file():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        out = []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            try:
                out.append(Release.model_validate_json(line))
            except ValidationError:
                if number == len(lines):  # the unfinished last line of a crashed write
                    continue
                # Anywhere else a line that is not a release was edited or written by another
                # version: skipping it would forget a release (and its privacy cost).
                raise FedmergeError(
                    f"{self.path}: line {number} is not a release record; expected one JSON "
                    "release per line (edited, or written by another fedmerge version?)"
                ) from None
        return out

    def spent_epsilon(self, delta: float, extra=()) -> float:
        """ε at δ of the most-charged patient, with `extra` charges (a run about to start)
        composed on top (see `epsilon_spent`)."""
        return epsilon_spent(self.entries(), delta, extra)

    def check(self, release: Release, max_per_day: int,
              budget: tuple[float, float] | None = None) -> str | None:
        """The rule this release would break, or None. `budget`: (max total ε, δ)."""
        earlier = self.entries()
        today = [e for e in earlier if e.kind == "release" and e.time > release.time - DAY_S]
        if len(today) >= max_per_day:
            return "ledger:daily-cap"
        if release.rho > 0:
            if budget is not None and over_budget(epsilon_spent([*earlier, release], budget[1]),
                                                  budget):
                return "dp:budget-exhausted"
            return None  # charged, not refused for its site count
        return _isolating(release, earlier)

    def check_sum(self, summed: Release) -> str | None:
        """At UNMASK: the rule a sum over `summed.sites` sites breaks, or None. Compared with
        every earlier release and sum of the same fold, terms and candidate except this
        round's own release line (which counted the sites sampled, not those summed). For
        exact sums: a noisy release is charged when it leaves, whoever is summed."""
        earlier = [e for e in self.entries()
                   if not (e.kind == "release" and (e.run, e.round, e.stage, e.fold)
                           == (summed.run, summed.round, summed.stage, summed.fold))]
        return _isolating(summed, earlier)

    def charge_would_exceed(self, run_charges, budget: tuple[float, float]) -> bool:
        """Whether a whole run (its `Gaussians`, every release of one fold) would take the
        most-charged patient past the budget: composed as if that patient were in it."""
        return over_budget(self.spent_epsilon(budget[1], extra=[run_charges]), budget)

    def record(self, release: Release) -> None:
        """Append one line (flushed and fsynced). A last line left unfinished by a crash is
        cut off first, so a torn write never runs into the next release's line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = os.pread(fd, size, 0)
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, (release.model_dump_json() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _isolating(release: Release, earlier: list[Release]) -> str | None:
    """`ledger:would-isolate` when an earlier line has the same fold, terms and a merge in
    common (`same_merge`) but another number of sites: the two sums would differ by whole
    sites. A line written before `merge_identity` is matched in its own form."""
    merges = [m for m in map(_merge, release.candidates) if m is not None]  # parsed once
    for e in earlier:
        if (e.fold, e.folds, e.fold_seed) != (release.fold, release.folds, release.fold_seed):
            continue
        if e.sites == release.sites:
            continue
        theirs = [m for m in map(_merge, e.candidates) if m is not None]
        if theirs:
            common = e.terms == release.terms and any(
                _close(mine, other) for mine in merges for other in theirs)
        else:  # this release's old form (itself, when it has no other)
            terms = release.terms if release.legacy_terms is None else release.legacy_terms
            mine = set(release.candidates if release.legacy_candidates is None
                       else release.legacy_candidates)
            common = e.terms == terms and bool(mine & set(e.candidates))
        if common:
            return "ledger:would-isolate"
    return None


def _by_partition(entries: list[Release]) -> list[list[list]]:
    """The noisy releases as partitions (folds, fold seed) → folds → their `Gaussians`."""
    out: dict[tuple[int, int], dict[int, list]] = {}
    for e in entries:
        c = e.charges()
        if c is not None:
            out.setdefault((e.folds, e.fold_seed), {}).setdefault(e.fold, []).append(c)
    return [list(folds.values()) for folds in out.values()]


def _rho(charges) -> float:
    return sum(c.count / (2 * c.sigma**2) for c in charges)


def _worst_rho(partitions: list[list[list]]) -> float:
    return float(sum(max(_rho(f) for f in p) for p in partitions))


def rho_spent(entries: list[Release]) -> float:
    """zCDP ρ spent by the most-charged patient: per partition (folds, seed) the largest
    fold's sum, summed over partitions (the ledger's looser bound, see `epsilon_spent`)."""
    return _worst_rho(_by_partition(entries))


MAX_FOLD_CHOICES = 64


def epsilon_spent(entries: list[Release], delta: float, extra=()) -> float:
    """ε at δ of the most-charged patient over these releases, plus `extra` charges
    (`Gaussians`) that every patient bears.

    A patient sits in one fold per partition; the worst patient is the worst choice of one fold
    per partition, each choice composed exactly (PLD, or zCDP where smaller). More than
    `MAX_FOLD_CHOICES` choices: the largest ρ and the largest τ sum per partition, composed in
    zCDP, bound every choice from above.
    """
    from common.dp.accounting import Gaussians, epsilon_of_rho, zcdp_epsilon

    partitions = _by_partition(entries)
    extra = [c for c in extra if c.count > 0]
    if not partitions and not extra:
        return 0.0
    if math.prod(len(p) for p in partitions) > MAX_FOLD_CHOICES:
        def tau(charges) -> float:
            return sum(c.count * c.tau for c in charges)

        rho = _worst_rho(partitions) + _rho(extra)
        taus = sum(max(tau(f) for f in p) for p in partitions) + tau(extra)
        return epsilon_of_rho(rho, delta) + taus
    choices = []
    for choice in itertools.product(*partitions):
        # Releases at one σ compose as one self-composed PLD; their τ (which differs only with
        # the site count, below 1e-5 at usual scales) is taken at its largest, which can only
        # raise the bound.
        merged: dict[float, tuple[int, float]] = {}
        for c in [*itertools.chain.from_iterable(choice), *extra]:
            k, t = merged.get(c.sigma, (0, 0.0))
            merged[c.sigma] = (k + c.count, max(t, c.tau))
        charges = tuple(sorted(Gaussians(s, k, t) for s, (k, t) in merged.items()))
        choices.append((zcdp_epsilon(charges, delta), charges))
    # Largest zCDP bound first; a choice whose zCDP bound (≥ its ε) is not above the worst ε
    # found cannot be the worst, so the PLDs are composed for a few choices only.
    worst = 0.0
    for bound, charges in sorted(choices, key=lambda c: c[0], reverse=True):
        if bound <= worst:
            break
        worst = max(worst, _epsilon_cached(charges, delta))
    return worst


@functools.lru_cache(maxsize=1024)
def _epsilon_cached(charges: tuple, delta: float) -> float:
    """A ledger is re-read at every round; the same choices compose to the same ε."""
    from common.dp.accounting import epsilon_of

    return epsilon_of(charges, delta)[0]


def over_budget(epsilon: float, budget: tuple[float, float]) -> bool:
    """ε spent (at the budget's δ) exceeds the budget's ε?"""
    return epsilon > budget[0] + 1e-9

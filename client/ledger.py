"""The site's release ledger: every sum this site took part in, kept by the site itself.

Why: a coordinator may keep everything and re-run. Summing the same fold of the same merge
once over {A, B, C, D} and again over {A, B, C} gives D's histogram by difference, exactly,
although each sum alone hides D. No single round shows that; only a memory across rounds
and runs does. Before a site hands its vector to a SecAgg+ round it looks here for an
earlier release of the same fold, fold seed, terms (parents, method, scoring, histogram)
and candidate summed over a DIFFERENT number of sites, and refuses (`ledger:would-isolate`);
it also caps releases per day (`ledger:daily-cap`). Each release is appended as one JSON
line, flushed and fsynced, so the ledger survives restarts; a line torn by a crash is
ignored when read (that release was not completed). `fedmerge node ledger` shows it.

What it does not stop without noise: different candidates on one fold summed over different
site sets still differ by the dropped site's stay and death counts (every histogram of a fold
has the same totals). Differential privacy bounds that: a noisy release is not refused for
its site count but CHARGED here (its zCDP ρ), and a release that would take the fold past the
site's total (ε, δ) budget is refused (`dp:budget-exhausted`). zCDP composes by adding ρ;
folds of one partition hold different patients, so a patient's spend is the largest sum
over the folds of a partition, and different partitions add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from common.protocol import RoundInstructions, candidate_key

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
    terms: str  # SHA-256 of parents, method, scoring and histogram spec
    candidates: tuple[str, ...]
    sites: int
    # zCDP cost of this release for any one patient of the fold (0: an exact, noiseless sum).
    rho: float = 0.0


def terms_digest(instr: RoundInstructions) -> str:
    fields = instr.model_dump(
        mode="json", include={"parent_fingerprints", "method", "scoring", "histogram"}
    )
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def release_rho(instr: RoundInstructions) -> float:
    """What releasing `instr` costs a patient of its fold, in zCDP ρ (0 without noise)."""
    if not instr.privacy.on:
        return 0.0
    from common.dp.accounting import calibrate

    cal = calibrate(instr.privacy, 2 * instr.histogram.bins)
    return len(instr.candidates) * cal.rho_release


def release_of(instr: RoundInstructions, *, run: int, sites: int, now: float | None = None
               ) -> Release:
    return Release(
        rho=release_rho(instr),
        time=time.time() if now is None else now,
        run=run,
        round=instr.round,
        stage=instr.stage,
        fold=instr.fold,
        folds=instr.folds,
        fold_seed=instr.fold_seed,
        terms=terms_digest(instr),
        candidates=tuple(json.dumps(candidate_key(c)) for c in instr.candidates),
        sites=sites,
    )


class ReleaseLedger:
    """An append-only JSON-lines file of this site's releases."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def entries(self) -> list[Release]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(Release.model_validate_json(line))
            except ValidationError:
                continue  # a line torn by a crash: that release never completed
        return out

    def spent_rho(self, extra: Release | None = None) -> float:
        """zCDP ρ spent by the most-charged patient, `extra` included (see `rho_spent`)."""
        return rho_spent([*self.entries(), *([extra] if extra is not None else [])])

    def check(self, release: Release, max_per_day: int,
              budget: tuple[float, float] | None = None) -> str | None:
        """The rule this release would break, or None. `budget`: (max total ε, δ)."""
        earlier = self.entries()
        today = [e for e in earlier if e.time > release.time - DAY_S]
        if len(today) >= max_per_day:
            return "ledger:daily-cap"
        if release.rho > 0:
            if budget is not None and over_budget(self.spent_rho(release), budget):
                return "dp:budget-exhausted"
            return None  # charged, not refused for its site count
        mine = set(release.candidates)
        for e in earlier:
            same = (e.fold, e.folds, e.fold_seed, e.terms) == (
                release.fold, release.folds, release.fold_seed, release.terms)
            if same and e.sites != release.sites and mine & set(e.candidates):
                return "ledger:would-isolate"
        return None

    def charge_would_exceed(self, rho_run: float, budget: tuple[float, float]) -> bool:
        """Whether a whole run costing `rho_run` per patient would exceed the budget."""
        return over_budget(self.spent_rho() + rho_run, budget)

    def record(self, release: Release) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (release.model_dump_json() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def rho_spent(entries: list[Release]) -> float:
    """zCDP ρ spent by the most-charged patient: per partition (folds, seed) the largest
    fold's sum, summed over partitions."""
    per_fold: dict[tuple[int, int, int], float] = {}
    for e in entries:
        key = (e.folds, e.fold_seed, e.fold)
        per_fold[key] = per_fold.get(key, 0.0) + e.rho
    per_partition: dict[tuple[int, int], float] = {}
    for (folds, seed, _), rho in per_fold.items():
        per_partition[(folds, seed)] = max(per_partition.get((folds, seed), 0.0), rho)
    return float(sum(per_partition.values()))


def over_budget(rho: float, budget: tuple[float, float]) -> bool:
    """ρ-zCDP in total exceeds (max ε, δ)? (OpenDP's conversion, as the run's own ε.)"""
    from common.dp.accounting import epsilon_of_rho

    max_epsilon, delta = budget
    return rho > 0 and epsilon_of_rho(rho, delta) > max_epsilon + 1e-9


def spent_epsilon(ledger: ReleaseLedger, delta: float) -> float:
    from common.dp.accounting import epsilon_of_rho

    return epsilon_of_rho(ledger.spent_rho(), delta)

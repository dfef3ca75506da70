"""The site ledger's privacy spend: the worst patient, composed with the run's own accountant.

Why: a site caps its total ε. If the ledger composed looser than the run was calibrated
(zCDP against PLD), a site whose total cap equals its per-run cap would refuse every run; if
it composed tighter than the truth, or missed that a patient sits in one fold per partition,
the cap would be a lie. These tests pin both sides with numbers from the accountant itself.
"""

from __future__ import annotations

import math

import pytest

from client.ledger import MAX_FOLD_CHOICES, Release, ReleaseLedger, epsilon_spent, rho_spent
from common.dp.accounting import (
    Gaussians,
    calibrate,
    epsilon_of,
    epsilon_of_rho,
    zcdp_epsilon,
)
from common.dp.settings import PrivacySettings

DELTA = 1e-6


def release(fold: int, count: int, sigma: float, *, folds: int = 2, seed: int = 0,
            tau: float = 0.0, legacy: bool = False, time: float = 1000.0) -> Release:
    """A noisy release of `count` candidates; `legacy`: a line written before σ was kept."""
    return Release(time=time, run=1, round=1, stage="tune", fold=fold, folds=folds,
                   fold_seed=seed, terms="t",
                   candidates=tuple(f"[{i / 100}]" for i in range(count)), sites=4,
                   rho=count / (2 * sigma**2), sigma=0.0 if legacy else sigma,
                   tau=0.0 if legacy else tau)


def test_a_site_whose_total_cap_is_one_run_accepts_exactly_one(tmp_path):
    s = PrivacySettings(mode="distributed", epsilon=8.0, delta=DELTA, releases=11,
                        honest_sites=3)
    cal = calibrate(s)
    ledger = ReleaseLedger(tmp_path / "ledger.jsonl")
    budget = (8.0, DELTA)
    assert not ledger.charge_would_exceed(cal.charges(11), budget)
    # The same run in zCDP terms would be refused before it started: what the PLD buys.
    assert zcdp_epsilon([cal.charges(11)], DELTA) > 8.0
    for r in range(11):
        ledger.record(release(0, 1, cal.sigma_total, tau=cal.tau_release).model_copy(
            update={"round": r + 1, "candidates": (f"[{r / 10}]",)}))
    assert ledger.spent_epsilon(DELTA) == pytest.approx(cal.epsilon, rel=1e-12)
    assert ledger.spent_epsilon(DELTA) <= 8.0
    assert ledger.charge_would_exceed(cal.charges(1), budget)
    one_more = release(0, 1, cal.sigma_total, tau=cal.tau_release).model_copy(
        update={"round": 12, "candidates": ("[0.05]",)})
    assert ledger.check(one_more, max_per_day=100, budget=budget) == "dp:budget-exhausted"


def test_folds_of_a_partition_are_parallel_and_partitions_compose():
    a = [release(0, 11, 3.0), release(1, 2, 3.0)]  # tuning fold 11, test fold 2 candidates
    assert epsilon_spent(a, DELTA) == pytest.approx(
        epsilon_of([Gaussians(3.0, 11)], DELTA)[0], rel=1e-12)
    # A second partition (another fold seed): its worst fold composes with the first's.
    b = [release(0, 3, 5.0, seed=7), release(1, 4, 5.0, seed=7)]
    assert epsilon_spent(a + b, DELTA) == pytest.approx(
        epsilon_of([Gaussians(3.0, 11), Gaussians(5.0, 4)], DELTA)[0], rel=1e-12)
    # zCDP's ρ agrees on which patient is worst, and is the looser bound.
    assert rho_spent(a + b) == pytest.approx(11 / 18 + 4 / 50, rel=1e-12)
    assert epsilon_spent(a + b, DELTA) < epsilon_of_rho(rho_spent(a + b), DELTA)


def test_the_worst_patient_is_searched_not_guessed():
    """Fold 0 has more ρ, fold 1 has more τ: the larger of the two compositions stands."""
    entries = [release(0, 11, 3.0), release(1, 10, 3.0, tau=0.05)]
    worst = max(epsilon_of([Gaussians(3.0, 11)], DELTA)[0],
                epsilon_of([Gaussians(3.0, 10, 0.05)], DELTA)[0])
    assert epsilon_spent(entries, DELTA) == pytest.approx(worst, rel=1e-12)
    assert epsilon_of([Gaussians(3.0, 10, 0.05)], DELTA)[0] > \
        epsilon_of([Gaussians(3.0, 11)], DELTA)[0]


def test_lines_written_before_sigma_was_kept_are_read_from_rho(tmp_path):
    ledger = ReleaseLedger(tmp_path / "ledger.jsonl")
    ledger.record(release(0, 11, 4.0, legacy=True))
    [e] = ledger.entries()
    assert e.sigma == 0.0
    assert e.charges().sigma == pytest.approx(4.0, rel=1e-12)
    assert ledger.spent_epsilon(DELTA) == pytest.approx(
        epsilon_of([Gaussians(4.0, 11)], DELTA)[0], rel=1e-9)


def test_too_many_fold_choices_fall_back_to_an_upper_bound():
    # 5 partitions of 3 folds each: 243 choices, more than the ledger enumerates.
    entries = [release(f, 2 + f, 4.0, folds=3, seed=p) for p in range(5) for f in range(3)]
    assert MAX_FOLD_CHOICES < 3**5
    exact = epsilon_of([Gaussians(4.0, 4 * 5)], DELTA)[0]  # the worst patient: fold 2 ×5
    bound = epsilon_spent(entries, DELTA)
    assert bound == pytest.approx(epsilon_of_rho(5 * 4 / 32, DELTA), rel=1e-12)
    assert bound >= exact
    assert math.isfinite(bound)


def test_exact_sums_cost_nothing():
    plain = Release(time=1.0, run=1, round=1, stage="tune", fold=0, folds=2, fold_seed=0,
                    terms="t", candidates=("[0.5]",), sites=4)
    assert plain.charges() is None
    assert epsilon_spent([plain], DELTA) == 0.0


def test_legacy_lines_take_tau_at_its_largest_for_their_sum():
    """A line from before τ was kept, of a sum over 20 sites at a small scale: τ is taken as
    if all 20 were the honest sites (the most a run could assume), not as 0."""
    from common.dp.accounting import distributed_tau

    old = release(0, 11, 1.5, legacy=True).model_copy(update={"sites": 20})
    charge = old.charges()
    assert charge.sigma == pytest.approx(1.5, rel=1e-12)
    assert charge.tau == distributed_tau(1.5 / math.sqrt(20), 20) > 0.1
    assert epsilon_spent([old], DELTA) > epsilon_of([Gaussians(1.5, 11)], DELTA)[0] + 1.0


def test_a_torn_last_line_is_cut_and_any_other_bad_line_is_an_error(tmp_path):
    from common.errors import FedmergeError

    ledger = ReleaseLedger(tmp_path / "ledger.jsonl")
    first, second = release(0, 2, 3.0), release(0, 3, 3.0, time=2000.0)
    ledger.record(first)
    with open(ledger.path, "a") as fh:
        fh.write('{"time": 10')  # a crash in the middle of a write
    assert ledger.entries() == [first]
    ledger.record(second)  # the torn tail is cut, not run into
    assert ledger.entries() == [first, second]
    assert ledger.path.read_text().count("\n") == 2
    with open(ledger.path, "a") as fh:
        fh.write('{"not": "a release"}\n')
    ledger.record(release(1, 1, 3.0))
    with pytest.raises(FedmergeError, match=r"ledger\.jsonl: line 3 is not a release record"):
        ledger.entries()


def test_the_pruned_search_finds_the_same_worst_patient_as_every_choice():
    """Six partitions (fold seeds) of two folds, releases at eleven different scales: the
    zCDP-ordered search with its cut gives the maximum over all 64 choices."""
    import itertools

    entries = []
    for seed in range(6):
        for fold in range(2):
            sigma = 2.0 + 0.37 * seed + 0.9 * fold
            entries.append(release(fold, 3 + 2 * fold + seed % 3, sigma, seed=seed))
    by_partition = [[e for e in entries if e.fold_seed == s] for s in range(6)]
    brute = max(
        epsilon_of([e.charges() for e in choice], DELTA)[0]
        for choice in itertools.product(*by_partition)
    )
    assert epsilon_spent(entries, DELTA) == pytest.approx(brute, rel=1e-9)

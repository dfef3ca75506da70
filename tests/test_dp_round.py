"""A whole tuning run with differential privacy on, real sites over the loopback Grid: the
noise reaches the sums, the report states the guarantee, the estimates respect the noise."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_support import task_identity  # noqa: F401 (autouse fixture)

from client import client_app as node_app
from server.grid import CoordinatorGrid
from simulation.loopback_grid import LoopbackGrid

NODES = [101, 102, 103]
DATA = "synthetic:sites=3,stays=60/60/60,seed=4"


def _run(tiny_parents, privacy: dict, site_privacy: str, histogram=None):
    """`histogram` (a HistogramSpec): name it on both sides; None leaves both to the mode's
    default."""
    from flwr.app import Context, RecordDict

    from server.coordinator import run_tuning
    from server.recipe import TuningRecipe

    a, b = tiny_parents
    configs = {
        101 + i: {
            "data": DATA, "parent-a": str(a), "parent-b": str(b), "split": "region",
            "sim-sites": 3, "sim-index": i, "min-cohort": 5, "min-positives": 1,
            "privacy": site_privacy, "max-epsilon-per-run": 32.0,
            **({"bins": histogram.bins, "bin-placement": histogram.placement}
               if histogram else {}),
        }
        for i in range(3)
    }
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        search={"strategy": "grid", "grid_points": 3}, privacy=privacy,
        histogram=histogram,
    )
    apps = {n: node_app.make_client_app() for n in configs}
    grid = CoordinatorGrid(LoopbackGrid(apps, configs))
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return run_tuning(grid, ctx, recipe, expected_sites=3, wait_s=1.0)


@pytest.fixture(scope="module")
def exact(tiny_parents):
    # Exact sums over the bins a noisy run uses by default (8 class-balanced ones), to
    # compare count by count.
    from common.metrics import NOISY_HISTOGRAM

    return _run(tiny_parents, {"mode": "off"}, "off", histogram=NOISY_HISTOGRAM)


@pytest.mark.parametrize("mode", ["distributed", "local"])
def test_a_private_run_releases_noisy_sums_and_states_its_guarantee(tiny_parents, exact, mode):
    from common.dp.accounting import calibrate
    from common.metrics import noisy_round_metrics
    from common.metrics.pooled import Z_95

    # The deployment default ε = 8: the test checks the mechanics. Not much larger: at ε = 32
    # a site's scale is 0.375 (local), a count's noise is 0 with probability 0.85, and all 16
    # counts of a candidate came out unchanged in about one run in 13 (seen in CI). At ε = 8
    # that chance is below 1e-8 per candidate; a noisy class total of the 16 deaths can reach
    # zero (about 0.2% per round), which is then reported as no AUROC (handled below).
    noisy = _run(tiny_parents, {"mode": mode, "epsilon": 8.0}, mode)
    p = noisy.privacy
    assert p["mode"] == mode and p["epsilon"] <= 8.0 and p["delta"] == 1e-6
    assert p["releases_per_fold"] == 3
    assert p["honest_sites"] == (2 if mode == "distributed" else 1)  # a majority of 3
    terms = noisy.recipe.privacy_terms(3)
    assert noisy.recipe.histogram_spec.bins == 8  # the default with noise on
    cal = calibrate(terms)
    assert p["sigma_site"] == pytest.approx(cal.sigma_site, rel=1e-6)
    # Local noise is the full scale at every site; distributed splits it over the 2 honest.
    assert cal.sigma_site == pytest.approx(
        cal.sigma_total / (2**0.5 if mode == "distributed" else 1.0))
    differ = 0
    # One round: its candidates share their class totals, and the coordinator's metrics are
    # exactly that reading of the released sums; noise-free, the same sums' sampling part.
    assert len({r.round for r in noisy.tune}) == 1
    sums = [r.histograms for r in noisy.tune]
    variance = cal.noise_variance(3)
    assert [r.metrics for r in noisy.tune] == noisy_round_metrics(sums, variance)
    shared_totals = np.mean([[pos.sum(), neg.sum()] for pos, neg in sums], axis=0)
    free_readings = noisy_round_metrics(sums, 0.0)
    for e, r, free in zip(exact.tune, noisy.tune, free_readings, strict=True):
        assert e.candidate == r.candidate
        diff = np.concatenate(r.histograms) - np.concatenate(e.histograms)
        differ += int(np.any(diff != 0))
        # The sum's noise has the variance of three site draws per count (6 SD bound).
        assert np.abs(diff).max() <= 6 * (3**0.5) * cal.sigma_site
        m = r.metrics
        assert m.noise_sd > 0
        if m.auroc is None:
            # Distributed noise has variance ≥ 1 per count, so over 8 bins a class total of
            # a few deaths can be ≤ 0 (rarely): that round reports no AUROC, as the rule says.
            assert shared_totals.min() <= 0
            continue
        assert m.auroc_ci[0] <= m.auroc <= m.auroc_ci[1]
        # The interval carries the noise: its squared half-width is the noise-free reading's
        # (sampling variance of the same sums) plus the noise's variance in AUROC.
        if m.auroc_ci[0] > 0 and m.auroc_ci[1] < 1:  # not cut at 0 or 1
            half, free_half = (m.auroc_ci[1] - m.auroc_ci[0]) / 2, (
                free.auroc_ci[1] - free.auroc_ci[0]) / 2
            assert half**2 - free_half**2 == pytest.approx((Z_95 * m.noise_sd) ** 2, rel=1e-6)
    assert differ == len(exact.tune)
    # λ* is the smoothed-curve rule's choice from the noisy curve, not the plain argmax's.
    from server.search import Evaluation, best_within_noise

    curve = [Evaluation(r.candidate, r.metrics, r.round) for r in noisy.tune]
    assert noisy.lambda_star == best_within_noise(curve).candidate
    # The report shows the curve the rule read: its posterior mean beside each raw AUROC.
    from server.report import report_dict

    report = report_dict(noisy)
    smooth = {t["lambda"]: t["auroc_smoothed"] for t in report["tune"]}
    if all(r.metrics.auroc is not None for r in noisy.tune):
        assert all(v is not None for v in smooth.values())
        assert smooth[noisy.lambda_star] == max(smooth.values())
    assert [t["auroc_smoothed"] for t in report_dict(exact)["tune"]] == [None] * len(exact.tune)


def test_a_site_requiring_noise_refuses_an_exact_run(tiny_parents):
    from common.errors import FedmergeError

    with pytest.raises(FedmergeError, match="dp:mode-below-policy"):
        _run(tiny_parents, {"mode": "off"}, "distributed")
    with pytest.raises(FedmergeError, match="dp:mode-below-policy"):
        _run(tiny_parents, {"mode": "distributed"}, "local")

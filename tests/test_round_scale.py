"""More sites, same answer: splitting one cohort over 10 simulated hospitals instead of its 3
gives bin-for-bin the same pooled histograms, hence the same λ* and held-out metrics."""

from __future__ import annotations

import numpy as np
import pytest

DATA = "synthetic:sites=3,stays=70/70/70,seed=2"
RECIPE = {
    "search": {"grid_points": 3},
    "histogram": {"bins": 128, "lo": -8.0, "hi": 8.0},
    "scoring": {"max_patient_tokens": 48},
}
LENIENT = {"min-cohort": 5, "min-positives": 0}


@pytest.mark.slow
def test_ten_sites_sum_to_the_same_result_as_three(tiny_parents, tmp_path):
    from simulation.runner import run_simulation

    runs = {}
    for split, sites in (("region", None), ("iid", 10)):
        runs[split] = run_simulation(
            data=DATA, split=split, sites=sites, parents=tiny_parents, method="slerp",
            out=tmp_path / split, recipe_fields=RECIPE,
            node_overrides={i: LENIENT for i in range(10)},
        ).outcome
    three, ten = runs["region"], runs["iid"]
    assert len(ten.contributing_sites) == 10 and len(three.contributing_sites) == 3
    assert ten.lambda_star == three.lambda_star
    for a, b in zip(three.tune, ten.tune, strict=True):
        assert a.candidate == b.candidate
        np.testing.assert_array_equal(a.histograms[0], b.histograms[0])
        np.testing.assert_array_equal(a.histograms[1], b.histograms[1])
    for key in ("lambda_star", "parent_a", "parent_b"):
        assert ten.test[key].metrics == three.test[key].metrics

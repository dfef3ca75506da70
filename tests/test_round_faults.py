"""Rounds that hold, on Flower's simulation engine: a site lost at every stage.

Each run injects faults through the test-only node key `test-fault` (client/client_app.py):
a site fails while scoring, at SecAgg+ setup, at key sharing, at the masked-vector stage or
at unmasking; one is merely slow, one slower than the scoring timeout. Every run must end
with the exact sum of the sites that completed (checked bin for bin against the histograms
computed centrally on their union) or with one clear line, and a failed site is never asked
again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import FedmergeError

LENIENT = {"min-cohort": 5, "min-positives": 0}
HIST = {"bins": 64, "lo": -8.0, "hi": 8.0}
RECIPE = {
    "search": {"grid_points": 3},
    "histogram": HIST,
    "secagg": {"timeout": 20.0},
    "scoring": {"max_patient_tokens": 48},
}


def _simulate(tiny_parents, tmp_path, data, faults, score_timeout=60.0):
    from simulation.runner import run_simulation

    overrides = {i: dict(LENIENT) for i in range(12)}
    for site, fault in faults.items():
        overrides[site]["test-fault"] = fault
    return run_simulation(
        data=data, split="region", parents=tiny_parents, method="linear", search="grid",
        out=tmp_path / "run", recipe_fields={**RECIPE, "score_timeout": score_timeout},
        node_overrides=overrides,
    )


def _central(tiny_parents, data, sites, fold, lam):
    """Histograms of λ on `fold` over the union of `sites`, computed in this process."""
    from transformers import AutoTokenizer

    from common.data import load_records
    from common.data.folds import select_fold
    from common.data.splits import split_records
    from common.merge.switch import InPlaceMerger
    from common.metrics import HistogramSpec, score_histograms
    from common.scoring import YesNoScorer

    a, b = tiny_parents
    _, parts = split_records(load_records(data), "region", None)
    merger = InPlaceMerger(a, b, method="linear")
    merger.apply(lam)
    scorer = YesNoScorer(merger.model, AutoTokenizer.from_pretrained(a), max_patient_tokens=48)
    prepared = scorer.prepare([r for i in sites for r in select_fold(parts[i], fold, 2, 0)])
    return score_histograms(scorer.score(prepared), prepared.labels, HistogramSpec(**HIST))


def _assert_exact(result, tiny_parents, data, sites):
    for res in result.outcome.tune:
        pos, neg = _central(tiny_parents, data, sites, 0, float(res.candidate))
        np.testing.assert_array_equal(res.histograms[0], pos)
        np.testing.assert_array_equal(res.histograms[1], neg)


@pytest.mark.slow
def test_sites_lost_while_scoring_at_setup_and_at_key_sharing(tiny_parents, tmp_path):
    """9 sites: one fails while scoring, one at setup, one at key sharing, one is merely
    slow. Round 1 sums the six others exactly; later rounds never ask the lost three."""
    data = "synthetic:sites=9,stays=40,seed=3"
    result = _simulate(tiny_parents, tmp_path, data, {
        0: "fail:score", 1: "fail:setup", 2: "fail:share_keys", 3: "slow:score:1",
    })
    report = json.loads((result.out / "report.json").read_text())
    assert report["refusals"] == []
    lost = {d["site"]: (d["round"], d["reason"]) for d in report["dropouts"]}
    assert lost == {
        "site-0": (1, "site:scoring-failed"),
        "site-1": (1, "site:failed"),
        "site-2": (1, "site:failed"),
    }
    survivors = [f"site-{i}" for i in range(3, 9)]
    assert all(r["sites"] == survivors for r in report["rounds"])
    assert report["rounds"][0]["failed"] == ["site-0", "site-1", "site-2"]
    assert all(r["failed"] == [] for r in report["rounds"][1:])
    _assert_exact(result, tiny_parents, data, range(3, 9))


@pytest.mark.slow
def test_sites_lost_at_the_masked_vector_stage_at_unmasking_and_by_timeout(tiny_parents,
                                                                           tmp_path):
    """7 sites: one slower than the scoring timeout is left out of round 1; one fails at the
    masked-vector stage (its vector is not in the sum); one refuses to unmask (its vector
    IS in the sum: the others' shares remove its mask). The sum is exact."""
    data = "synthetic:sites=7,stays=40,seed=4"
    result = _simulate(tiny_parents, tmp_path, data, {
        0: "fail:collect_masked_vectors", 1: "fail:unmask", 2: "slow:score:25",
    }, score_timeout=6.0)
    report = json.loads((result.out / "report.json").read_text())
    lost = {d["site"]: d for d in report["dropouts"]}
    assert set(lost) == {"site-0", "site-1", "site-2"}
    assert lost["site-2"]["reason"].startswith("still scoring after 6 s per candidate")
    first = report["rounds"][0]
    assert first["sites"] == ["site-1", "site-3", "site-4", "site-5", "site-6"]
    assert first["failed"] == ["site-0", "site-1", "site-2"]
    assert all(res.round == 1 for res in result.outcome.tune)  # a 3-point grid: one round
    _assert_exact(result, tiny_parents, data, [1, 3, 4, 5, 6])


@pytest.mark.slow
def test_too_few_sites_left_is_one_clear_line(tiny_parents, tmp_path):
    data = "synthetic:sites=3,stays=40,seed=5"
    with pytest.raises(FedmergeError) as err:
        _simulate(tiny_parents, tmp_path, data, {1: "fail:score"})
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "round 1 (tune): 2 of 3 sites finished scoring, the recipe needs min_sites=3 "
        "(failed: site-1 (site:scoring-failed))"
    )
    # As a deployed run does, the simulation leaves a report.json naming stage, cause, rule
    # and the site missing.
    assert err.value.report == tmp_path / "run" / "report.json"
    report = json.loads(err.value.report.read_text())
    assert (report["status"], report["cause"]) == ("failed", "too-few-sites")
    assert report["stage"] == "round 1 (tune): scoring"
    assert report["sites_missing"] == ["site-1"]
    assert report["sites_answered"] == ["site-0", "site-2"]

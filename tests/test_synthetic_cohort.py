"""The synthetic cohort: deterministic, heterogeneous across sites, and informative in both
its numeric and its clinical sections (so that neither demo parent alone can be enough)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.data import synthetic as sc
from common.errors import FedmergeError


@pytest.fixture(scope="session")
def cohort():
    return sc.generate_cohort()


@pytest.fixture(scope="session")
def big_cohort():
    return sc.generate_cohort(4, seed=11, stays_per_site=[600, 600, 600, 600])


def _physiology_from_text(record) -> float:
    """Recompute the derangement from the rendered chart events only."""
    (chart,) = [s.text for s in record.sections if s.name == "chart_events"]
    measures = {m.label: m for m in (*sc.VITALS, *sc.LABS)}
    items = re.findall(r"([0-9.]+) for ([A-Za-z0-9 ]+?)(?:;|\.$)", chart)
    assert items
    return sc.physiology_score([(measures[label], float(v)) for v, label in items])


def _clinical_from_text(record) -> float:
    weights = {name: w for opts in sc.CONDITIONS.values() for name, w in opts}
    weights.update(dict(sc.COMORBIDITIES))
    weights.update({name: 0.6 * w for name, w, _, _ in sc.MEDICATIONS})
    weights.update({name: 0.8 * w for name, w in sc.PROCEDURES})
    text = " ".join(s.text for s in record.sections if s.name != "chart_events")
    items = re.split(r"[;:.]| of | with ", text)
    return sum(weights.get(item.strip(), 0.0) for item in items)


def test_default_shape_ids_and_text(cohort):
    sites = Counter(r.site_id for r in cohort)
    assert sorted(sites) == ["site-0", "site-1", "site-2"]
    assert all(200 <= n <= 300 for n in sites.values())
    assert len({r.stay_id for r in cohort}) == len(cohort)
    r = cohort[0]
    assert r.text == " ".join(s.text for s in r.sections)
    assert r.text.startswith("The patient ")
    assert "The chart events mesured are : " in r.text
    hard = r.hard()
    assert [s.name for s in hard.sections][0] == "chart_events"
    assert "diagnosed" not in hard.text


def test_texts_are_short_for_cpu_scoring(cohort, tiny_tokenizer):
    lengths = [len(tiny_tokenizer(r.text)["input_ids"]) for r in cohort]
    assert 60 <= np.mean(lengths) <= 150
    assert max(lengths) <= 200


def test_deterministic_per_seed_and_seed_matters(cohort):
    again = sc.generate_cohort()
    assert [(r.stay_id, r.label, r.text) for r in again] == [
        (r.stay_id, r.label, r.text) for r in cohort
    ]
    other = sc.generate_cohort(seed=7)
    assert {r.text for r in other}.isdisjoint({r.text for r in cohort})


def test_per_site_heterogeneity(big_cohort):
    by_site: dict[str, list] = {}
    for r in big_cohort:
        by_site.setdefault(r.site_id, []).append(r)
    rates = [np.mean([r.label for r in rs]) for rs in by_site.values()]
    assert max(rates) - min(rates) > 0.04, rates
    assert all(0.05 < x < 0.45 for x in rates), rates
    # Case mix: the share of elective surgical stays differs between hospitals.
    surgical = {name for name, _ in sc.CONDITIONS["surgical"]}
    shares = [
        np.mean([any(f"with {s}" in r.text for s in surgical) for r in rs])
        for rs in by_site.values()
    ]
    assert max(shares) - min(shares) > 0.04, shares
    sizes = Counter(r.site_id for r in sc.generate_cohort(5, seed=3)).values()
    assert len(set(sizes)) > 1


def test_mortality_needs_numeric_and_clinical_evidence(big_cohort):
    y = np.array([r.label for r in big_cohort])
    phys = np.array([_physiology_from_text(r) for r in big_cohort])
    clin = np.array([_clinical_from_text(r) for r in big_cohort])
    auc_phys, auc_clin = roc_auc_score(y, phys), roc_auc_score(y, clin)
    both = (phys - sc.PHYS_CENTRE) / sc.PHYS_SCALE + (clin - sc.CLIN_CENTRE) / sc.CLIN_SCALE
    auc_both = roc_auc_score(y, both)
    assert 0.65 < auc_phys < 0.88 and 0.65 < auc_clin < 0.88, (auc_phys, auc_clin)
    assert auc_both > max(auc_phys, auc_clin) + 0.03, (auc_phys, auc_clin, auc_both)


def test_load_synthetic_spec():
    assert [r.stay_id for r in sc.load_synthetic("")] == [r.stay_id for r in sc.generate_cohort()]
    five = sc.load_synthetic("sites=5,seed=7")
    assert sorted({r.site_id for r in five}) == [f"site-{i}" for i in range(5)]
    sized = sc.load_synthetic("sites=2,stays=3/4")
    assert Counter(r.site_id for r in sized) == {"site-0": 3, "site-1": 4}
    assert len(sc.load_synthetic("stays=10")) == 30


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("sites=x", "field 'sites' is 'x', expected an integer"),
        ("colour=red", "unknown field 'colour'"),
        ("sites", "'sites' is not key=value"),
        ("stays=1/2", "stays has 2 values, expected one per site (3)"),
        ("sites=0", "sites=0, expected an integer >= 1"),
    ],
)
def test_bad_spec_is_one_clear_error(spec, expected):
    with pytest.raises(FedmergeError, match=re.escape(expected)):
        sc.load_synthetic(spec)

"""End to end on Flower's simulation engine (Ray): one run, many assertions.

Eight simulated hospitals on tiny real checkpoints: sites 0-2 take part normally, site 3
drops out inside every SecAgg+ round (test-only fault key), and sites 4-7 each break one rule
of their policy. The pooled metrics must equal those computed centrally on the union of sites
0-2, bin for bin; every message the coordinator received must be free of per-site numbers.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from common.secure_sum import SITE_WEIGHT, encode_histograms

DATA = "synthetic:sites=8,stays=48,seed=7"
GOOD = (0, 1, 2)
LENIENT = {"min-cohort": 5, "min-positives": 1}
BINS = 512
HIST = {"bins": BINS, "lo": -8.0, "hi": 8.0}


@pytest.fixture(scope="module")
def sim(tiny_parents, tmp_path_factory):
    from simulation.runner import run_simulation

    a, b = tiny_parents
    overrides = {i: dict(LENIENT) for i in range(8)}
    overrides[3]["test-fault"] = "drop"
    overrides[4]["min-sites"] = 20
    overrides[5]["min-positives"] = 10_000
    overrides[6].update({"parent-a": str(b), "parent-b": str(a)})
    overrides[7]["max-candidates"] = 2
    out = tmp_path_factory.mktemp("sim") / "run"
    result = run_simulation(
        data=DATA,
        split="region",
        parents=(a, b),
        method="slerp",
        search="grid",
        out=out,
        recipe_fields={
            "search": {"grid_points": 5},
            "histogram": HIST,
            "secagg": {"timeout": 60.0},
            "scoring": {"max_patient_tokens": 64},
        },
        node_overrides=overrides,
    )
    return result


@pytest.fixture(scope="module")
def central(sim, tiny_parents):
    """The same scores computed in this process on the union of the good sites' folds."""
    from transformers import AutoTokenizer

    from common.data import load_records
    from common.data.folds import select_fold
    from common.data.splits import split_records
    from common.merge.switch import InPlaceMerger
    from common.metrics import HistogramSpec, score_histograms
    from common.scoring import YesNoScorer

    a, b = tiny_parents
    _, parts = split_records(load_records(DATA), "region", None)
    merger = InPlaceMerger(a, b, method="slerp")
    scorer = YesNoScorer(merger.model, AutoTokenizer.from_pretrained(a), max_patient_tokens=64)
    spec = HistogramSpec(**HIST)

    def per_site(fold, lam):
        merger.apply(lam)
        out = []
        for i in GOOD:
            prepared = scorer.prepare(select_fold(parts[i], fold, 2, 0))
            out.append((scorer.score(prepared), np.asarray(prepared.labels)))
        return out

    def union(fold, lam):
        rows = per_site(fold, lam)
        scores = np.concatenate([s for s, _ in rows])
        labels = np.concatenate([y for _, y in rows])
        return scores, labels, score_histograms(scores, labels, spec), rows

    return union, spec


def test_completes_with_the_right_sites(sim):
    o = sim.outcome
    assert o.contributing_sites == ["site-0", "site-1", "site-2"]
    assert o.accepted_sites == ["site-0", "site-1", "site-2", "site-3"]
    assert [float(t.candidate) for t in o.tune] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for t in o.tune:
        assert t.sites == ["site-0", "site-1", "site-2"]
    report = json.loads((sim.out / "report.json").read_text())
    assert report["lambda_star"] == o.lambda_star
    assert report["contributing_sites"] == ["site-0", "site-1", "site-2"]
    assert set(report["test"]) == {"lambda_star", "parent_a", "parent_b"}
    assert (sim.out / "curve.png").stat().st_size > 1000
    assert "slerp" in (sim.out / "recipe.yaml").read_text()
    tune_keys = {"lambda", "auroc", "auprc", "auroc_ci", "n", "positives", "auroc_error_bound"}
    assert tune_keys | {"sites"} <= set(report["tune"][0])
    assert [r["stage"] for r in report["rounds"]] == ["tune", "test"]
    assert all(0 < r["seconds"] < 600 for r in report["rounds"])


def test_pooled_metrics_equal_central_union_exactly(sim, central):
    from sklearn.metrics import roc_auc_score

    from common.metrics import pooled_metrics

    union, _ = central
    for t in sim.outcome.tune:
        scores, labels, (pos, neg), _ = union(0, float(t.candidate))
        np.testing.assert_array_equal(t.histograms[0], pos)
        np.testing.assert_array_equal(t.histograms[1], neg)
        m = pooled_metrics(pos, neg)
        assert t.metrics.auroc == m.auroc and t.metrics.auprc == m.auprc
        assert t.metrics.n == len(labels) and t.metrics.positives == int(labels.sum())
        exact = roc_auc_score(labels, scores)
        assert abs(t.metrics.auroc - exact) <= t.metrics.auroc_error_bound + 1e-12
    # Held-out fold: λ*, and both parents.
    for name, lam in (
        ("parent_a", 0.0),
        ("parent_b", 1.0),
        ("lambda_star", sim.outcome.lambda_star),
    ):
        res = sim.outcome.test[name]
        _, _, (pos, neg), _ = union(1, float(lam))
        np.testing.assert_array_equal(res.histograms[0], pos)
        np.testing.assert_array_equal(res.histograms[1], neg)
    best = max(sim.outcome.tune, key=lambda t: (t.metrics.auroc, t.metrics.auprc))
    assert sim.outcome.lambda_star == best.candidate


def test_refusals_and_dropout_reach_the_report(sim):
    report = json.loads((sim.out / "report.json").read_text())
    by_site = {r["site"]: r for r in report["refusals"]}
    assert by_site["site-4"]["reason"] == "policy:min-sites"
    assert by_site["site-5"]["reason"] == "policy:min-positives"
    assert by_site["site-6"]["reason"] == "policy:parents-differ"
    assert by_site["site-7"]["reason"] == "policy:max-candidates"
    assert all(r["stage"] == "announcement" for r in report["refusals"])
    # No refusal reveals anything of the site but the rule: no number at all.
    for r in report["refusals"]:
        assert not re.findall(r"\d", r["reason"]), r
    # Site 3 failed inside round 1's SecAgg+ exchange: it is reported once and then left out
    # (a failed site is never asked again), and round 1 still summed the other three.
    assert [(d["site"], d["round"]) for d in report["dropouts"]] == [("site-3", 1)]
    assert report["rounds"][0]["failed"] == ["site-3"]
    assert all(r["failed"] == [] for r in report["rounds"][1:])
    assert all(r["sites"] == ["site-0", "site-1", "site-2"] for r in report["rounds"])


def test_server_received_nothing_per_site_in_the_clear(sim, central):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    union, spec = central
    received = sim.grid.received
    assert received, "the recording grid saw no messages"
    # Every site's plaintext vector for the tuning round.
    cands = [float(t.candidate) for t in sim.outcome.tune]
    per_site_hists = {i: [] for i in range(len(GOOD))}
    from common.metrics import score_histograms

    for lam in cands:
        _, _, _, rows = union(0, lam)
        for i, (s, y) in enumerate(rows):
            per_site_hists[i].append(score_histograms(s, y, spec))
    plaintexts = [encode_histograms(h, BINS) for h in per_site_hists.values()]
    masked_seen = 0
    for msg in received:
        if msg.has_error():
            continue
        content = msg.content
        for name, rec in content.metric_records.items():
            assert name == "fitres.num_examples" and dict(rec) == {"num_examples": SITE_WEIGHT}
        for name, rec in content.config_records.items():
            if name == "fitres.metrics":
                assert len(rec) == 0
        for rec in content.array_records.values():
            assert len(rec) == 0  # the SecAgg+ mod cleared the plaintext parameters
        cfg = content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            for raw in cfg[Key.MASKED_PARAMETERS]:
                arr = bytes_to_ndarray(raw)
                masked_seen += 1
                for p in plaintexts:
                    assert arr.shape != p.shape or not np.array_equal(arr, p)
        if "fedmerge" in content.config_records:
            reply = json.loads(content.config_records["fedmerge"]["fedmerge.reply"])
            # A policy acceptance, or scoring progress: names and candidate counts only.
            assert set(reply) in ({"site", "accepted"}, {"site", "round", "done", "total"})
    assert masked_seen >= 2 * len(GOOD)


def test_recipe_yaml_rebuilds_the_chosen_model(sim, tmp_path):
    """`fedmerge merge recipe.yaml` gives the model whose held-out figures the report shows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from common.cli import app
    from common.data import load_records
    from common.data.folds import select_fold
    from common.data.splits import split_records
    from common.metrics import HistogramSpec, pooled_metrics, score_histograms
    from common.scoring import YesNoScorer

    merged = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(sim.out / "recipe.yaml"), str(merged)])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    scorer = YesNoScorer(model, AutoTokenizer.from_pretrained(merged), max_patient_tokens=64)
    _, parts = split_records(load_records(DATA), "region", None)
    prepared = scorer.prepare([r for i in GOOD for r in select_fold(parts[i], 1, 2, 0)])
    pos, neg = score_histograms(scorer.score(prepared), prepared.labels, HistogramSpec(**HIST))
    got = pooled_metrics(pos, neg)
    want = json.loads((sim.out / "report.json").read_text())["test"]["lambda_star"]
    assert (got.n, got.positives) == (want["n"], want["positives"])
    assert got.auroc == pytest.approx(want["auroc"], abs=1e-12)
    assert got.auprc == pytest.approx(want["auprc"], abs=1e-12)

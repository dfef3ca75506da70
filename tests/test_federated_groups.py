"""One λ per parameter group, end to end: simulate with `--groups`, then rebuild λ* offline."""

from __future__ import annotations

import json

import pytest
import yaml

DATA = "synthetic:sites=3,stays=40,seed=11"
HIST = {"bins": 256, "lo": -8.0, "hi": 8.0}


def test_group_search_pools_exactly_and_recipe_rebuilds_it(tiny_parents, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from common.cli import app
    from common.data import load_records
    from common.data.folds import select_fold
    from common.merge.switch import InPlaceMerger
    from common.metrics import HistogramSpec, pooled_metrics, score_histograms
    from common.scoring import YesNoScorer
    from simulation.runner import run_simulation

    lenient = {"min-cohort": 5, "min-positives": 1}
    result = run_simulation(
        data=DATA, parents=tiny_parents, out=tmp_path / "run",
        recipe_fields={
            "groups": ["attention", "mlp"], "search": {"grid_points": 2}, "histogram": HIST,
            "scoring": {"max_patient_tokens": 64}, "secagg": {"timeout": 60.0},
        },
        node_overrides={i: lenient for i in range(3)},
    )
    report = json.loads((result.out / "report.json").read_text())
    assert [t["lambda"] for t in report["tune"]] == [
        {"attention": a, "mlp": m} for a in (0.0, 1.0) for m in (0.0, 1.0)
    ]
    star = report["lambda_star"]
    assert set(star) == {"attention", "mlp"}

    # The pooled tuning figure of one mixed candidate equals the central union's.
    records = load_records(DATA)
    spec = HistogramSpec(**HIST)
    merger = InPlaceMerger(*tiny_parents, method="slerp")
    scorer = YesNoScorer(
        merger.model, AutoTokenizer.from_pretrained(tiny_parents[0]), max_patient_tokens=64
    )
    tune = scorer.prepare(select_fold(records, 0, 2, 0))
    merger.apply({"attention": 1.0, "mlp": 0.0})
    central = pooled_metrics(*score_histograms(scorer.score(tune), tune.labels, spec))
    mixed = next(t for t in report["tune"] if t["lambda"] == {"attention": 1.0, "mlp": 0.0})
    assert (mixed["n"], mixed["auroc"], mixed["auprc"]) == (
        central.n, central.auroc, central.auprc
    )

    # recipe.yaml carries the groups as name filters; the model it builds scores as reported.
    recipe = yaml.safe_load((result.out / "recipe.yaml").read_text())
    assert [f.get("filter") for f in recipe["parameters"]["t"]] == ["self_attn", "mlp", None]
    merged = tmp_path / "merged"
    res = CliRunner().invoke(app, ["merge", str(result.out / "recipe.yaml"), str(merged)])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    held = YesNoScorer(model, AutoTokenizer.from_pretrained(merged), max_patient_tokens=64)
    test = held.prepare(select_fold(records, 1, 2, 0))
    got = pooled_metrics(*score_histograms(held.score(test), test.labels, spec))
    assert got.auroc == pytest.approx(report["test"]["lambda_star"]["auroc"], abs=1e-12)


def test_simulate_flags_override_the_recipe_file(tmp_path, tiny_parents):
    from common.errors import FedmergeError
    from simulation.cli import _recipe_fields

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "parent_a": str(tiny_parents[0]), "parent_b": str(tiny_parents[1]), "method": "linear",
        "search": {"strategy": "adaptive", "tolerance": 0.2}, "histogram": {"bins": 64},
    }))
    fields, parents, method, search = _recipe_fields(path, None, None, "grid", "mlp", 5, True)
    assert parents == tiny_parents and method == "linear" and search == "grid"
    assert fields == {
        "search": {"tolerance": 0.2, "grid_points": 5}, "histogram": {"bins": 64},
        "groups": ["mlp"], "scoring": {"hard": True},
    }
    path.write_text(yaml.safe_dump({"search": {"grid_points": 1}}))
    with pytest.raises(FedmergeError, match=r"recipe.yaml: field 'search.grid_points'"):
        _recipe_fields(path, None, None, None, None, None, False)

"""`fedmerge score` end to end on a tiny checkpoint and a jsonl file."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from common.cli import app
from common.data.folds import select_fold
from common.errors import FedmergeError
from tests.test_scoring import make_records

KEYS = {"n", "positives", "auroc", "auprc", "auroc_ci", "federated", "stays_per_s"}


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    records = make_records(30, seed=3, max_sentences=6)
    path = tmp_path_factory.mktemp("data") / "stays.jsonl"
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps({"id": r.stay_id, "text": r.text, "label": r.label}) + "\n")
    return path, records


def _run(*args):
    return CliRunner().invoke(app, ["score", *map(str, args)])


def test_score_json_and_scores_out(tiny_parents, jsonl, tmp_path):
    path, records = jsonl
    out_csv = tmp_path / "scores.csv"
    res = _run("--model", tiny_parents[0], "--data", f"jsonl:{path}", "--scores-out", out_csv,
               "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary) == KEYS
    assert summary["n"] == 30 and summary["positives"] == sum(r.label for r in records)
    assert summary["stays_per_s"] > 0
    with out_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == [r.stay_id for r in records]
    assert [int(r["label"]) for r in rows] == [r.label for r in records]
    labels = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["p_yes"]) for r in rows])
    assert ((p > 0) & (p < 1)).all() and p.std() > 1e-4
    # The printed metrics are exactly scikit-learn's on the written scores.
    assert summary["auroc"] == pytest.approx(roc_auc_score(labels, p), abs=1e-9)
    assert summary["auprc"] == pytest.approx(average_precision_score(labels, p), abs=1e-9)
    lo, hi = summary["auroc_ci"]
    assert lo <= summary["auroc"] <= hi
    # The federation's binned view is an extra field, with its error against the exact one.
    fed = summary["federated"]
    assert fed["bins"] == 32
    assert fed["auroc_error"] == pytest.approx(abs(fed["auroc"] - summary["auroc"]), abs=1e-12)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["scores.csv"]  # no temp file left


def test_score_fold_table_and_chat_template(tiny_parents, jsonl):
    path, records = jsonl
    want = select_fold(records, 1, 2)
    res = _run("--model", tiny_parents[0], "--data", f"jsonl:{path}", "--fold", 1, "--folds", 2,
               "--chat-template", "--batch-tokens", 512, "--max-patient-tokens", 32)
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.stdout and "stays/s" in res.stdout and "95% CI" in res.stdout
    assert re.search(r"stays \(n\)\s*│\s*(\d+)", res.stdout).group(1) == str(len(want))
    js = _run("--model", tiny_parents[0], "--data", f"jsonl:{path}", "--fold", 1, "--folds", 2,
              "--json")
    summary = json.loads(js.stdout.strip().splitlines()[-1])
    assert summary["n"] == len(want) < 30
    assert summary["positives"] == sum(r.label for r in want)


def test_score_parity(tiny_parents, jsonl):
    path, records = jsonl
    res = _run("--model", tiny_parents[0], "--data", f"jsonl:{path}", "--parity", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(summary) == KEYS and summary["n"] == 30
    assert summary["auroc"] is None or 0.0 <= summary["auroc"] <= 1.0


def test_score_single_class_reports_undefined(tiny_parents, tmp_path):
    path = tmp_path / "alive.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"a{i}", "text": "The patient is diagnosed with sepsis .", "label": 0})
        + "\n" for i in range(4)
    ))
    res = _run("--model", tiny_parents[0], "--data", f"jsonl:{path}", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["positives"] == 0
    assert summary["auroc"] is None and summary["auprc"] is None and summary["auroc_ci"] is None
    assert "undefined" in res.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "/nonexistent/model", "--data", "jsonl:x"], "config.json not found"),
        (["--fold", "0"], "expected both or neither"),
    ],
)
def test_score_bad_input(tiny_parents, jsonl, args, needle):
    path, _ = jsonl
    base = ["--model", tiny_parents[0], "--data", f"jsonl:{path}"]
    res = _run(*(args if "--model" in args else base + args))
    assert res.exit_code != 0
    assert isinstance(res.exception, FedmergeError) and needle in str(res.exception)

"""The coordinator's view of a deployed run: progress.json while it runs, a report.json that
names the stage, the cause, the rules and the sites when it fails (no Flower needed here;
tests/test_deploy_faults.py checks the same on real processes)."""

from __future__ import annotations

import json

from server.run_follow import outcome_lines, progress_line
from server.run_progress import RunTracker


def test_failed_announcement_names_stage_rule_and_sites(tmp_path):
    tracker = RunTracker(tmp_path, run_id=7, expected_sites=3)
    tracker("nodes", count=3)
    refusal = {"site": "hospital-c", "stage": "announcement", "reason": "policy:min-cohort"}
    tracker("announced", accepted=["hospital-a", "hospital-b"], refusals=[refusal],
            nodes={1: "hospital-a", 2: "hospital-b"})
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["stage"] == "announcement" and progress["accepted"] == [
        "hospital-a", "hospital-b"]
    assert progress_line(progress).endswith(
        "announcement; 2 sites accepted, 1 refused or dropped; 0 round(s) done")
    report = tracker.failure("announcement: 2 of 3 sites accepted, the recipe needs min_sites=3"
                             " (hospital-c: policy:min-cohort)", "too-few-sites")
    assert report["stage"] == "announcement" and report["cause"] == "too-few-sites"
    assert report["rules"] == {"hospital-c": "policy:min-cohort"}
    assert report["sites_answered"] == ["hospital-a", "hospital-b"]
    assert report["sites_missing"] == ["hospital-c"]
    assert json.loads((tmp_path / "progress.json").read_text())["status"] == "failed"
    code, lines = outcome_lines(report)
    assert code == 1
    assert lines[0].startswith("failed at announcement: too-few-sites — announcement: 2 of 3")
    assert "  refused by hospital-c: policy:min-cohort" in lines
    assert "  sites missing: hospital-c" in lines


def test_a_site_lost_in_a_round_is_named_missing(tmp_path):
    tracker = RunTracker(tmp_path, run_id=8, expected_sites=3)
    tracker("nodes", count=3)
    tracker("announced", accepted=["a", "b", "c"], refusals=[], nodes={1: "a", 2: "b", 3: "c"})
    tracker("round_start", round=1, stage="tune", candidates=[0.0, 0.5, 1.0])
    tracker("score_progress", round=1, stage="tune", site="a", done=2, total=3)
    assert "scored: a 2/3" in progress_line(json.loads((tmp_path / "progress.json").read_text()))
    dropout = {"site": "c", "round": 1, "reason": "still scoring after 8 s per candidate"}
    tracker("site_lost", round=1, site="c", refusals=[], dropouts=[dropout])
    report = tracker.failure("round 1 (tune): 2 of 3 sites finished scoring, the recipe needs "
                             "min_sites=3 (still scoring: c (0/3))", "too-few-sites")
    assert report["stage"] == "round 1 (tune): scoring"
    assert report["sites_missing"] == ["c"] and report["sites_answered"] == ["a", "b"]
    assert report["dropouts"] == [dropout] and report["cause"] == "too-few-sites"


def test_submit_says_how_to_follow_stop_and_that_an_interrupted_wait_leaves_the_run(
        tmp_path, tiny_parents, monkeypatch):
    """The lines around the upload (the upload and the wait themselves run for real in
    tests/test_deploy_faults.py, run D)."""
    import yaml
    from typer.testing import CliRunner

    import server.run_follow as follow
    from common.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"parent_a": str(tiny_parents[0]),
                                      "parent_b": str(tiny_parents[1])}))
    args = ["coordinator", "submit", str(recipe), "--out", str(tmp_path / "out"),
            "--stage-dir", str(tmp_path / "staged"), "--flwr-home", str(tmp_path / "home")]
    monkeypatch.setattr(follow, "upload", lambda argv, env: 42)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(follow, "wait_for_report", interrupted)
    detached = CliRunner().invoke(app, [*args, "--detach"])
    assert detached.exit_code == 0, detached.output
    assert "submitted run 42\nfollow it:  flwr log 42 fedmerge" in detached.output
    assert "stop it:    flwr stop 42 fedmerge" in detached.output
    waited = CliRunner().invoke(app, args)
    assert waited.exit_code == 130
    assert waited.output.splitlines()[-1] == (
        "stopped waiting; run 42 continues on the SuperLink. Follow it with `flwr log 42 "
        "fedmerge`, stop it with `flwr stop 42 fedmerge`")
    monkeypatch.setattr(follow, "upload", interrupted)
    before = CliRunner().invoke(app, args)
    assert before.exit_code == 130
    assert "interrupted before the upload finished: no run was submitted" in before.output


def test_a_halted_secure_round_names_the_missing_sites(tmp_path):
    from common.errors import RunStopped
    from server.coordinator import with_site_names

    names = {4611686018427387904: "hospital-a", 123456789012345: "hospital-b", 7: "hospital-c"}
    # As server.secagg raises it: the nodes travel with the error, never parsed from its text
    # (where "7" or "3" could be taken for a node id).
    stop = RunStopped("round 2 (tune): secure aggregation halted, too few of the 3 sites "
                      "completed it (reconstruction threshold 3); node 123456789012345: "
                      "site:failed; no answer within 20 s from nodes [4611686018427387904]",
                      cause="too-few-sites", nodes=[123456789012345, 4611686018427387904])
    message = str(stop)
    missing = list(stop.nodes)
    assert with_site_names(message, missing, names.get).endswith(
        "; sites missing: hospital-a, hospital-b")
    tracker = RunTracker(tmp_path, run_id=9, expected_sites=3)
    tracker("nodes", count=3)
    tracker("announced", accepted=sorted(names.values()), refusals=[],
            nodes={})
    tracker("round_start", round=2, stage="tune", candidates=[0.5])
    tracker("secagg_start", round=2, stage="tune", sites=3)
    tracker("secagg_failed", round=2, missing=["hospital-a", "hospital-b"])
    report = tracker.failure(with_site_names(message, missing, names.get), stop.cause)
    assert report["stage"] == "round 2 (tune): secure aggregation"
    assert report["sites_missing"] == ["hospital-a", "hospital-b"]
    assert report["sites_answered"] == ["hospital-c"] and report["cause"] == "too-few-sites"

"""Site policy, node config and recipe validation (pure functions, no Flower run)."""

from __future__ import annotations

import pytest

from client import policy
from client.node_config import SitePolicy, parse_node_config
from common.errors import FedmergeError
from common.protocol import Refusal
from server.recipe import SecAggSettings, TuningRecipe, recipe_from_run_config


def test_policy_rules():
    p = SitePolicy(min_sites=3, min_cohort=10, min_positives=2, max_candidates=4)
    assert policy.check_sites(p, 3) is None
    assert policy.check_sites(p, 2) == "policy:min-sites"
    assert policy.check_cohort(p, {0: (10, 2), 1: (12, 3)}) is None
    assert policy.check_cohort(p, {0: (10, 2), 1: (9, 3)}) == "policy:min-cohort"
    assert policy.check_cohort(p, {0: (50, 1)}) == "policy:min-positives"
    assert policy.check_candidates(p, [0.0, 0.5, 1.0]) is None
    assert policy.check_candidates(p, [0.5, 1.2]) == "policy:lambda-range"
    assert policy.check_candidates(p, [{"attention": -0.1, "mlp": 0.2}]) == "policy:lambda-range"
    assert policy.check_candidates(p, [{"embed": 0.1}]) == "policy:unknown-group"
    assert policy.check_candidates(p, [0.1] * 5) == "policy:max-candidates"
    assert policy.check_count(p, 11) == "policy:max-candidates"
    assert policy.check_parents(("a", "b"), ("a", "x")) == "policy:parents-differ"
    assert policy.first_refusal(None, "x", "y") == "x"
    # Every code a check can return is documented for the node's log.
    for code in ("policy:min-sites", "policy:min-cohort", "policy:lambda-range"):
        assert code in policy.RULES


def test_refusals_never_carry_the_sites_own_counts():
    """A refusal is a fixed code: the same whatever the site's counts, so it reveals no more
    than that one rule was broken."""
    p = SitePolicy(min_cohort=40, min_positives=7)
    assert policy.check_cohort(p, {0: (23, 1)}) == policy.check_cohort(p, {0: (39, 6)})
    assert policy.check_cohort(p, {0: (123, 3)}) == policy.check_cohort(p, {0: (41, 6)})


def test_refusal_round_trips_through_an_error_reason():
    r = Refusal(site="site-2", reason="cohort too small")
    wrapped = f"<class 'ClientAppException'>:<'Exception occurred. Message: {r.to_reason()}'>"
    assert Refusal.from_reason(wrapped) == r
    assert Refusal.from_reason("plain crash {not json}") is None


def test_node_config_parsing_and_errors(tmp_path):
    cfg = parse_node_config(
        {
            "site": "north",
            "data": "jsonl:/x.jsonl",
            "parent-a": "/a",
            "parent-b": "/b",
            "min-sites": 4,
            "partition-id": 0,
        }
    )
    assert cfg.site == "north" and cfg.policy.min_sites == 4 and cfg.policy.min_cohort == 20
    assert SitePolicy().min_sites == 3
    with pytest.raises(FedmergeError, match="node config: unknown key 'min_site'"):
        parse_node_config({"data": "x", "parent-a": "/a", "parent-b": "/b", "min_site": 3})
    with pytest.raises(FedmergeError, match=r"node\.toml: field 'parent_b'"):
        parse_node_config({"data": "x", "parent-a": "/a"}, source="node.toml")
    with pytest.raises(FedmergeError, match="field 'policy.min_cohort'"):
        parse_node_config({"data": "x", "parent-a": "/a", "parent-b": "/b", "min-cohort": 0})
    assert cfg.threads is None
    minimal = {"data": "x", "parent-a": "/a", "parent-b": "/b"}
    assert parse_node_config({**minimal, "threads": 3}).threads == 3
    with pytest.raises(FedmergeError, match="field 'threads'"):
        parse_node_config({"data": "x", "parent-a": "/a", "parent-b": "/b", "threads": 0})


def test_recipe_from_run_config_and_validation():
    r = recipe_from_run_config(
        {"parent-a": "/a", "parent-b": "/b", "search": "adaptive", "bins": 256, "out": "x"}
    )
    assert r.search.strategy == "adaptive" and r.histogram.bins == 256
    assert r.fingerprint() == r.model_copy().fingerprint()
    assert r.fingerprint() != r.model_copy(update={"method": "linear"}).fingerprint()
    # Paths and timeouts do not change what sites compute.
    moved = r.model_copy(update={"parent_a": "/elsewhere/a"})
    assert moved.fingerprint() == r.fingerprint()
    with pytest.raises(FedmergeError, match="unknown key 'serach'"):
        recipe_from_run_config({"parent-a": "/a", "parent-b": "/b", "serach": "grid"})
    with pytest.raises(FedmergeError, match="field 'min_sites'"):
        recipe_from_run_config({"parent-a": "/a", "parent-b": "/b", "min-sites": 2})
    with pytest.raises(FedmergeError, match="field 'search.strategy'"):
        recipe_from_run_config({"parent-a": "/a", "parent-b": "/b", "search": "random"})
    g = recipe_from_run_config({"parent-a": "/a", "parent-b": "/b", "groups": "attention,mlp"})
    assert g.groups == ("attention", "mlp") and g.parent_candidate(1) == {
        "attention": 1.0,
        "mlp": 1.0,
    }
    with pytest.raises(FedmergeError, match="config.json not found"):
        TuningRecipe(parent_a="/nope/a", parent_b="/nope/b").with_fingerprints()


def test_secagg_threshold_meets_every_sites_guard():
    """The recipe's fraction, raised to a strict majority and to min_sites: what the sites'
    SecAgg+ guards accept by default."""
    s = SecAggSettings()
    assert [s.threshold_for(n) for n in (3, 4, 5, 10, 25, 50)] == [3, 3, 3, 7, 17, 34]
    assert s.threshold_for(4, min_sites=4) == 4
    assert [s.shares_for(n) for n in (3, 10)] == [3, 10]
    assert SecAggSettings(num_shares=0.5).shares_for(10) == 5  # odd below the site count
    with pytest.raises(FedmergeError, match="exceeds 5 shares"):
        SecAggSettings(num_shares=0.5).threshold_for(10)
    with pytest.raises(ValueError, match="must exceed 2"):
        SecAggSettings(num_shares=2)
    with pytest.raises(ValueError, match=r"\(0\.5, 1\]"):
        SecAggSettings(reconstruction_threshold=0.4)

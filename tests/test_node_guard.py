"""A hospital node against a curious or deviating coordinator (attacks 2, 4, 5 and 6 of the
node-guard issue; the SecAgg+ attacks are in test_secagg_guard.py).

Real fedmerge ClientApps on tiny real checkpoints and the synthetic cohort, behind a loopback
Grid; the attacker is the coordinator: it sends what it likes, per site, and keeps every
reply. Each test asserts that the attacker learns nothing about one site: the site refused
with a fixed code before releasing anything, and the node keeps serving afterwards.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message
from secagg_support import LoopbackGrid, task_identity  # noqa: F401 (autouse fixture)

from client import client_app as node_app
from common.protocol import INSTRUCTIONS_KEY, RECORD_NAME, Refusal, RoundInstructions
from server.coordinator import announce
from server.grid import CoordinatorGrid
from server.recipe import TuningRecipe
from server.scoring_round import score_round
from server.secagg import RoundOutcome

pytestmark = pytest.mark.adversarial

DATA = "synthetic:sites=3,stays=48,seed=7"
NODES = [101, 102, 103]


def _configs(parents, **extra):
    a, b = parents
    return {
        101 + i: {
            "data": DATA, "parent-a": str(a), "parent-b": str(b), "split": "region",
            "sim-sites": 3, "sim-index": i, "min-cohort": 5, "min-positives": 1, **extra,
        }
        for i in range(3)
    }


def _edit_request(target: int | None, edit):
    """Rewrite the JSON request the coordinator sends to `target` (None: to every site)."""

    def tamper(msg: Message) -> Message:
        rec = msg.content.config_records.get(RECORD_NAME)
        if rec is not None and (target is None or msg.metadata.dst_node_id == target):
            data = json.loads(str(rec[INSTRUCTIONS_KEY]))
            edit(data.get("instructions", data))
            msg.content.config_records[RECORD_NAME] = ConfigRecord(
                {INSTRUCTIONS_KEY: json.dumps(data)}
            )
        return msg

    return tamper


@pytest.fixture(scope="module")
def recipe(tiny_parents):
    a, b = tiny_parents
    return TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
    ).with_fingerprints()


def _grid(tiny_parents, tamper=None, configs=None):
    configs = configs or _configs(tiny_parents)
    apps = {n: node_app.make_client_app() for n in configs}
    return CoordinatorGrid(LoopbackGrid(apps, configs, tamper=tamper))


def _codes(grid) -> dict[int, str]:
    return {m.metadata.src_node_id: Refusal.from_reason(m.error.reason).reason
            for m in grid.received if m.has_error()}


def _still_serves(grid, recipe) -> None:
    """After the attack, an honest announcement and round go through at every site."""
    grid.inner.tamper = None
    accepted, refusals = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES and refusals == []
    instr = recipe.round_instructions(round=7, stage="tune", candidates=[0.5], sites=3)
    assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES


@pytest.mark.parametrize(
    "edit,code",
    [
        # A decoy spec: every patient of the other sites in one bin, so that the sum shows
        # one site's histogram in the remaining bins.
        (lambda d: d.update(histogram={"bins": 2048, "lo": 15.9, "hi": 16.0}),
         "policy:histogram-not-allowed"),
        # Any yes/no question about the records.
        (lambda d: d["scoring"].update(template="Is this patient HIV positive? {patient_data}"),
         "policy:template-not-allowed"),
        # The bins of the other mode (32, for exact sums) under noise: each bin carries its
        # own noise, so more bins than the noise was sized for; the spec follows the mode only.
        (lambda d: d.update(histogram={"bins": 32, "placement": "reference"}),
         "policy:histogram-not-allowed"),
    ],
    ids=["decoy-histogram", "free-prompt", "exact-bins-under-noise"],
)
def test_unbound_instructions_are_refused_at_the_announcement(tiny_parents, recipe, edit,
                                                               code):
    target = 102  # the two other sites get the decoy; 101 would be read by difference
    grid = _grid(tiny_parents, tamper=lambda m: m if m.metadata.dst_node_id == 101
                 else _edit_request(None, edit)(m))
    accepted, _ = announce(grid, recipe, NODES)
    assert sorted(accepted) == [101]
    assert _codes(grid) == {target: code, 103: code}
    _still_serves(grid, recipe)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(histogram={"bins": 2048, "lo": 15.9, "hi": 16.0}),
        lambda d: d["scoring"].update(template="Is this patient HIV positive? {patient_data}"),
        lambda d: d.update(fold_seed=12345),
        lambda d: d.update(recipe_fingerprint="another recipe"),
    ],
    ids=["decoy-histogram", "free-prompt", "other-fold-seed", "other-recipe"],
)
def test_a_round_must_ask_what_the_site_accepted(tiny_parents, recipe, edit):
    """The coordinator announces honestly, then sends the rounds something else."""
    grid = _grid(tiny_parents)
    accepted, _ = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES
    grid.inner.tamper = _edit_request(102, edit)
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3)
    scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
    assert scored.ready == [101, 103]
    assert Refusal.from_reason(scored.failed[102]).reason == "round:differs-from-announcement"
    # It released nothing: it holds no histograms for the round.
    assert node_app.stored_histograms(grid.inner.contexts[102], instr)[1] == "round:not-scored"


def test_errors_never_reach_the_coordinator_as_text(tiny_parents, recipe, tmp_path):
    """A duplicate-id error carries the file path and the record id; only a code leaves."""
    rows = [{"id": "MRN-0042731", "label": i % 2, "text": f"The patient {i} ."}
            for i in range(30)]
    rows.append(dict(rows[0]))  # the duplicate
    bad = tmp_path / "secret-site-path" / "stays.jsonl"
    bad.parent.mkdir()
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = _configs(tiny_parents)
    configs[102] = {**configs[102], "data": f"jsonl:{bad}"}
    for key in ("split", "sim-sites", "sim-index"):
        configs[102].pop(key)
    grid = _grid(tiny_parents, configs=configs)
    accepted, refusals = announce(grid, recipe, NODES)
    assert 102 not in accepted
    assert _codes(grid)[102] == "site:data-unavailable"
    seen = repr([m.error.reason if m.has_error() else m.content for m in grid.received])
    assert "MRN" not in seen and "secret-site-path" not in seen and "duplicate" not in seen


def test_refusals_are_no_size_oracle(tiny_parents, recipe):
    """Varying folds, fold seed and scored folds is refused by rule before anything is
    counted, with the same code at a small and at a large site: the replies do not depend
    on the site's size."""
    configs = _configs(tiny_parents)
    configs[103] = {**configs[103], "data": "synthetic:sites=3,stays=48/48/480,seed=7"}
    probes = [
        lambda d: d.update(folds=3),
        lambda d: d.update(folds=17),
        lambda d: d.update(fold_seed=d["fold_seed"] + 1),
        lambda d: d.update(score_folds=[0, 1, 2]),
        lambda d: d.update(score_folds=[5]),
    ]
    answers = []
    for probe in probes:
        grid = _grid(tiny_parents, tamper=_edit_request(None, probe), configs=configs)
        announce(grid, recipe, NODES)
        answers.append(_codes(grid))
    for codes in answers:
        assert set(codes) == set(NODES)
        assert codes[101] == codes[103]  # a 16-stay fold and a 240-stay fold answer alike
        assert codes[101] in {"policy:folds-not-allowed", "policy:fold-not-allowed"}


@pytest.mark.parametrize(
    "edit,code",
    [
        (lambda d: d.update(histogram={"bins": 10**9, "lo": -16.0, "hi": 16.0}),
         "policy:histogram-not-allowed"),
        (lambda d: d.update(folds=10**6), "policy:folds-not-allowed"),
        (lambda d: d["scoring"].update(max_patient_tokens=10**9),
         "policy:scoring-out-of-bounds"),
        (lambda d: d["scoring"].update(batch_tokens=10**9), "policy:scoring-out-of-bounds"),
        (lambda d: d.update(max_candidates_per_round=10**6), "policy:max-candidates"),
    ],
    ids=["bins", "folds", "patient-tokens", "batch-tokens", "candidates"],
)
def test_unbounded_requests_are_refused_and_the_node_keeps_serving(tiny_parents, recipe, edit,
                                                                   code):
    grid = _grid(tiny_parents, tamper=_edit_request(None, edit))
    accepted, _ = announce(grid, recipe, NODES)
    assert accepted == {}
    assert set(_codes(grid).values()) == {code}
    _still_serves(grid, recipe)


@pytest.mark.parametrize("reannounce", [False, True], ids=["plain", "re-announced"])
def test_rounds_per_run_are_capped(tiny_parents, recipe, reannounce):
    """`re-announced`: a coordinator that announces again before each round, within the
    same run, does not start the count again (it did: round 3 was scored)."""
    configs = _configs(tiny_parents, **{"max-rounds": 2})
    grid = _grid(tiny_parents, configs=configs)
    announce(grid, recipe, NODES)
    for rnd in (1, 2, 3):
        if reannounce and rnd > 1:
            accepted, _ = announce(grid, recipe, NODES)
            assert sorted(accepted) == NODES
        instr = recipe.round_instructions(round=rnd, stage="tune", candidates=[0.5], sites=3)
        scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
        if rnd < 3:
            assert scored.ready == NODES
    assert scored.ready == []
    assert {Refusal.from_reason(r).reason for r in scored.failed.values()} == {
        "policy:max-rounds"}


def test_every_refusal_code_is_documented():
    """Every code the node, its guard or the coordinator can produce has its meaning in the
    protocol's table (and nothing else may stand in a refusal)."""
    from pathlib import Path

    from common.protocol import REFUSAL_CODES

    root = Path(node_app.__file__).resolve().parents[1]
    source = "".join(
        p.read_text() for folder in ("client", "server") for p in (root / folder).glob("*.py")
    )
    used = set(re.findall(r'"((?:policy|round|site|score|request|secagg|dp|ledger):[a-z-]+)"',
                          source))
    assert used and used <= set(REFUSAL_CODES), used - set(REFUSAL_CODES)


def test_the_parent_fingerprint_covers_the_tokenizer_and_chat_template(tiny_parents, tmp_path):
    """Two sites whose parents differ only in the chat template would score different
    prompts under one announced fingerprint."""
    import shutil

    from common.model_io import fingerprint

    copy = tmp_path / "parent"
    shutil.copytree(tiny_parents[0], copy)
    assert fingerprint(copy) == fingerprint(tiny_parents[0])
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'Answer yes. ' + messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert fingerprint(copy) != fingerprint(tiny_parents[0])


def _four_sites(tiny_parents, ledgers, privacy="off", **extra):
    """Four real sites of one cohort, each with its ledger file (or none)."""
    a, b = tiny_parents
    configs = {
        101 + i: {
            "data": "synthetic:sites=4,stays=48,seed=9", "parent-a": str(a),
            "parent-b": str(b), "split": "region", "sim-sites": 4, "sim-index": i,
            "min-cohort": 5, "min-positives": 0, "bins": 16, "lo": -4.0, "hi": 4.0,
            "bin-placement": "uniform", "privacy": privacy,
            **({"ledger": str(ledgers / f"site-{i}.jsonl")} if ledgers else {}), **extra,
        }
        for i in range(4)
    }
    return configs


def _one_run(tiny_parents, configs, recipe, nodes, tamper=None, grids=None,
             candidates=(0.25, 0.75)):
    """A whole honest-looking run over `nodes`: announce, score, sum; the summed histograms.
    `tamper` rewrites what nodes receive; the grid is appended to `grids` when given."""
    from server.secagg import secure_round

    grid = _grid(tiny_parents, tamper=tamper, configs={n: configs[n] for n in nodes})
    if grids is not None:
        grids.append(grid)
    announce(grid, recipe, nodes)
    instr = recipe.round_instructions(round=1, stage="tune", candidates=list(candidates),
                                      sites=len(nodes))
    scored = score_round(grid, nodes, instr, timeout_per_candidate=60)
    if scored.ready != nodes:
        return None, scored
    from flwr.app import Context, RecordDict

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return secure_round(grid, ctx, node_ids=nodes, instructions=instr,
                        settings=recipe.secagg).histograms, scored


def _assert_difference_is_site(first, second, configs, recipe, node: int) -> None:
    """The two summed runs differ by exactly `node`'s own histograms (candidates 0.25, 0.75)."""
    import numpy as np

    from client.node_config import parse_node_config
    from client.task import score_one

    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=4)
    own = [score_one(parse_node_config(configs[node]), instr, i) for i in range(2)]
    for c in range(2):
        for k in range(2):
            np.testing.assert_array_equal(first[c][k] - second[c][k], own[c][k])


@pytest.mark.parametrize("with_ledger", [False, True], ids=["no-ledger", "ledger"])
def test_differencing_two_runs_isolates_a_site_only_without_the_ledger(tiny_parents,
                                                                       tmp_path, with_ledger):
    """Run 1 over {A, B, C, D}, run 2 over {A, B, C} with the same fold and candidates: the
    difference is D's histograms. The ledger makes A, B and C refuse run 2's release."""

    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        histogram={"bins": 16, "lo": -4.0, "hi": 4.0}, privacy={"mode": "off"},
    ).with_fingerprints()
    configs = _four_sites(tiny_parents, tmp_path if with_ledger else None)
    first, _ = _one_run(tiny_parents, configs, recipe, [101, 102, 103, 104])
    second, scored = _one_run(tiny_parents, configs, recipe, [101, 102, 103])
    if not with_ledger:
        _assert_difference_is_site(first, second, configs, recipe, 104)  # the attack works
        return
    assert second is None
    assert {Refusal.from_reason(r).reason for r in scored.failed.values()} == {
        "ledger:would-isolate"}
    # The ledger is what each site wrote itself: one release each, over four sites.
    from client.ledger import ReleaseLedger

    for i in range(3):
        entries = ReleaseLedger(tmp_path / f"site-{i}.jsonl").entries()
        assert [(e.kind, e.sites) for e in entries] == [("release", 4), ("sum", 4)]


_EVERY_GROUP = ("attention", "mlp", "other")
# Run 2's wording of run 1's merges (run 1: λ 0.25 and 0.75 under linear; the parents, λ 0 and
# 1, for the last): (recipe changes, candidates). Each gives run 1's scores again.
REWORDED = {
    "lambda-plus-1e-9": ({}, [0.25 + 1e-9, 0.75 + 1e-9]),
    "every-group-named": ({}, [{g: 0.25 for g in _EVERY_GROUP}, {g: 0.75 for g in _EVERY_GROUP}]),
    "one-group-named": ({}, [{"attention": 0.25}, {"mlp": 0.75}]),  # the rest take its λ
    "batch-tokens": ({"batch_tokens": 4095}, [0.25, 0.75]),
    "parents-under-slerp": ({"method": "slerp"}, [0.0, 1.0]),
}


@pytest.mark.parametrize("reworded", list(REWORDED))
def test_a_reworded_candidate_is_the_same_candidate_to_the_ledger(tiny_parents, tmp_path,
                                                                 reworded):
    """Run 1 sums two merges over {A, B, C, D}; run 2 asks the same merges over {A, B, C} in
    other words, which give the same scores (λ + 1e-9, λ given per group, another batch size,
    the parents under the other method). Matched on the wording, the ledger let run 2 through
    and run 1 - run 2 was D's histograms, exactly (and two honest runs that tested the parents
    under linear and then slerp would have done the same). Matched on the model a candidate
    builds (`client.ledger.merge_identity`), A, B and C refuse."""
    changes, candidates = REWORDED[reworded]
    a, b = tiny_parents

    def recipe_with(method: str = "linear", batch_tokens: int = 4096) -> TuningRecipe:
        return TuningRecipe(
            parent_a=str(a), parent_b=str(b), method=method,
            scoring={"max_patient_tokens": 64, "batch_tokens": batch_tokens},
            histogram={"bins": 16, "lo": -4.0, "hi": 4.0}, privacy={"mode": "off"},
        ).with_fingerprints()

    first_candidates = (0.0, 1.0) if reworded == "parents-under-slerp" else (0.25, 0.75)
    configs = _four_sites(tiny_parents, tmp_path)
    first, _ = _one_run(tiny_parents, configs, recipe_with(), [101, 102, 103, 104],
                        candidates=first_candidates)
    assert first is not None
    second, scored = _one_run(tiny_parents, configs, recipe_with(**changes), [101, 102, 103],
                              candidates=candidates)
    assert second is None
    assert {n: Refusal.from_reason(r).reason for n, r in scored.failed.items()} == {
        n: "ledger:would-isolate" for n in (101, 102, 103)}


def test_the_ledger_compares_merges_not_their_wording():
    """`same_merge` by distance: λ a hair apart are one merge wherever they fall (rounding
    would have split 0.12345 from 0.12345 - 2e-13); λ 1e-4 apart still are, 2e-4 not;
    the parents are one merge under either method, a per-group pick of parents too."""
    from client.ledger import merge_identity, same_merge

    def same(a, b, method_a="linear", method_b="linear") -> bool:
        return same_merge(merge_identity(a, method_a), merge_identity(b, method_b))

    for lam in (0.5, 0.12345, 0.25005, 5e-05, 0.99995):
        assert same(lam, lam + 1e-9) and same(lam, lam - 2e-13)
    assert same(0.5, {"mlp": 0.5}) and same(0.5, {g: 0.5 for g in _EVERY_GROUP})
    assert same(0.5, 0.5001) and not same(0.5, 0.5002)
    assert not same(0.5, 0.5, method_b="slerp")  # another model
    assert same(0.0, 0.0, method_b="slerp") and same(1.0, 0.99995, method_b="slerp")
    assert same(0.0, {"attention": 0.0, "mlp": 0.0, "other": -0.0}, method_b="slerp")
    mixed = {"attention": 0.0, "mlp": 1.0, "other": 1.0}
    assert same(mixed, mixed, method_b="slerp") and not same(mixed, 1.0)
    assert same({"attention": 0.2, "mlp": 0.8}, {"attention": 0.2, "mlp": 0.8, "other": 0.5})


def test_a_line_written_before_merge_identity_still_matches(tmp_path):
    """A ledger kept by an earlier version holds the terms with the method and batch size and
    the candidates as written; a new release of the same fold and candidate over another
    number of sites must still be refused against it."""
    import hashlib

    from client.ledger import Release, ReleaseLedger, release_of
    from common.protocol import candidate_key

    instr = _recipe_for_ledger().round_instructions(round=1, stage="tune",
                                                    candidates=[0.25, 0.75], sites=4)
    fields = instr.model_dump(
        mode="json", include={"parent_fingerprints", "method", "scoring", "histogram"})
    old_terms = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    old_line = Release(time=1.0, run=1, round=1, stage="tune", fold=instr.fold,
                       folds=instr.folds, fold_seed=instr.fold_seed, terms=old_terms,
                       candidates=tuple(json.dumps(candidate_key(c)) for c in (0.25, 0.75)),
                       sites=4)
    ledger = ReleaseLedger(tmp_path / "old.jsonl")
    ledger.record(old_line)
    three = release_of(instr.model_copy(update={"sites": 3}), run=2, sites=3)
    assert ledger.check(three, max_per_day=100, budget=(32.0, 1e-6)) == "ledger:would-isolate"
    four = release_of(instr, run=2, sites=4)
    assert ledger.check(four, max_per_day=100, budget=(32.0, 1e-6)) is None


def _recipe_for_ledger() -> TuningRecipe:
    return TuningRecipe(parent_a="a", parent_b="b", method="linear", privacy={"mode": "off"},
                        fingerprint_a="a" * 64, fingerprint_b="b" * 64)


def _never_collect(victim: int):
    """A coordinator that breaks `victim`'s masked-vector request: the victim refuses it, so
    its vector is never collected and UNMASK lists it dead."""
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    def tamper(msg: Message) -> Message:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (msg.metadata.dst_node_id == victim and cfg is not None
                and cfg.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS):
            cfg[Key.STAGE] = Stage.UNMASK
        return msg

    return tamper


@pytest.mark.parametrize("with_ledger", [False, True], ids=["no-ledger", "ledger"])
def test_a_site_dropped_before_unmask_is_not_isolated(tiny_parents, tmp_path, with_ledger):
    """Both runs SAMPLE {A, B, C, D} with the same fold and candidates, so every check on the
    sampled count passes; in run 2 the coordinator never collects D's vector, UNMASK lists D
    dead and the sum holds A, B and C: the difference is D's histograms. With their ledgers,
    A, B and C compare the size of the sum itself at UNMASK and keep their shares."""

    from common.errors import RunStopped

    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        histogram={"bins": 16, "lo": -4.0, "hi": 4.0}, privacy={"mode": "off"},
    ).with_fingerprints()
    configs = _four_sites(tiny_parents, tmp_path if with_ledger else None)
    nodes = [101, 102, 103, 104]
    first, _ = _one_run(tiny_parents, configs, recipe, nodes)
    grids: list = []
    if not with_ledger:
        second, _ = _one_run(tiny_parents, configs, recipe, nodes, _never_collect(104), grids)
        assert _codes(grids[0]) == {104: "secagg:stage-out-of-order"}
        _assert_difference_is_site(first, second, configs, recipe, 104)  # the attack works
        return
    with pytest.raises(RunStopped, match="secure aggregation halted"):
        _one_run(tiny_parents, configs, recipe, nodes, _never_collect(104), grids)
    assert _codes(grids[0]) == {101: "ledger:would-isolate", 102: "ledger:would-isolate",
                                103: "ledger:would-isolate", 104: "secagg:stage-out-of-order"}
    from client.ledger import ReleaseLedger

    for i in range(3):  # run 2's vector left (four sampled), its sum was never answered
        entries = ReleaseLedger(tmp_path / f"site-{i}.jsonl").entries()
        assert [(e.run, e.kind, e.sites) for e in entries] == [
            (1, "release", 4), (1, "sum", 4), (1, "release", 4)]


def test_a_first_sum_that_lost_a_site_is_answered_and_written_down(tiny_parents, tmp_path):
    """A real dropout is not an attack: the first sum of a fold and candidate may hold fewer
    sites than were sampled; the ledger writes down the size that was summed."""
    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        histogram={"bins": 16, "lo": -4.0, "hi": 4.0}, privacy={"mode": "off"},
    ).with_fingerprints()
    configs = _four_sites(tiny_parents, tmp_path)
    summed, _ = _one_run(tiny_parents, configs, recipe, [101, 102, 103, 104],
                         _never_collect(104))
    assert summed is not None
    from client.ledger import ReleaseLedger

    for i in range(3):
        entries = ReleaseLedger(tmp_path / f"site-{i}.jsonl").entries()
        assert [(e.kind, e.sites) for e in entries] == [("release", 4), ("sum", 3)]


def test_the_unmask_rule_answers_only_for_this_rounds_own_release(tiny_parents, tmp_path):
    """The check at UNMASK reads the release this site made in THAT round (its group id):
    a stale one from an earlier round is neither checked nor written down again."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from client.client_app import PENDING_SUM, unmask_rule
    from client.ledger import Release, ReleaseLedger
    from client.node_config import parse_node_config

    cfg = parse_node_config(_four_sites(tiny_parents, tmp_path)[101])
    first = Release(time=1.0, run=1, round=1, stage="tune", fold=0, folds=2, fold_seed=0,
                    terms="t", candidates=("[0.5]",), sites=4)
    ledger = ReleaseLedger(cfg.ledger)
    ledger.record(first)
    ledger.record(first.model_copy(update={"kind": "sum"}))
    again = first.model_copy(update={"run": 2, "time": 2.0})
    ledger.record(again)
    ctx = Context(run_id=2, node_id=101, node_config={}, state=RecordDict(), run_config={})
    ctx.state.config_records[PENDING_SUM] = ConfigRecord(
        {"release": again.model_dump_json(), "group": "4"})
    assert unmask_rule(ctx, cfg, 3, "5") is None  # another round: not this site's release
    assert PENDING_SUM in ctx.state.config_records
    assert unmask_rule(ctx, cfg, 3, "4") == "ledger:would-isolate"  # run 1 summed 4
    assert PENDING_SUM not in ctx.state.config_records  # one answer per round
    assert [e.kind for e in ledger.entries()] == ["release", "sum", "release"]
    ctx.state.config_records[PENDING_SUM] = ConfigRecord(
        {"release": again.model_dump_json(), "group": "6"})
    assert unmask_rule(ctx, cfg, 4, "6") is None  # the same size: answered, written down
    assert [(e.run, e.kind, e.sites) for e in ledger.entries()][-1] == (2, "sum", 4)


def test_the_ledger_survives_a_torn_line_and_caps_releases_per_day(tmp_path):
    from client.ledger import Release, ReleaseLedger

    ledger = ReleaseLedger(tmp_path / "ledger.jsonl")
    r = Release(time=1000.0, run=1, round=1, stage="tune", fold=0, folds=2, fold_seed=0,
                terms="t", candidates=("[0.5]",), sites=4)
    ledger.record(r)
    with open(ledger.path, "a") as fh:
        fh.write('{"time": 10')  # a crash in the middle of a write
    assert ledger.entries() == [r]
    later = r.model_copy(update={"time": 2000.0, "candidates": ("[0.7]",), "sites": 3})
    assert ledger.check(later, max_per_day=2) is None  # another candidate: allowed
    assert ledger.check(later, max_per_day=1) == "ledger:daily-cap"
    same = later.model_copy(update={"candidates": ("[0.5]",)})
    assert ledger.check(same, max_per_day=5) == "ledger:would-isolate"
    assert ledger.check(same.model_copy(update={"sites": 4}), max_per_day=5) is None


def test_an_unexpected_failure_reaches_the_coordinator_as_a_code_only(tiny_parents, recipe,
                                                                      monkeypatch):
    """Anything raised inside the node (here: a loader error carrying a path and a record
    id) is logged at the node; the coordinator sees `site:handler-failed` and nothing else."""
    import client.task

    def broken(cfg, ann):
        raise RuntimeError("/data/site-b/stays.csv: row 17: MRN-0042731 unreadable")

    monkeypatch.setattr(client.task, "check_announcement", broken)
    grid = _grid(tiny_parents)
    accepted, _ = announce(grid, recipe, NODES)
    assert accepted == {}
    assert set(_codes(grid).values()) == {"site:handler-failed"}
    seen = repr([m.error.reason for m in grid.received if m.has_error()])
    assert "MRN" not in seen and "site-b" not in seen and "RuntimeError" not in seen


def test_with_noise_the_difference_is_noise_and_the_ledger_charges_the_budget(tiny_parents,
                                                                              tmp_path):
    """The same differencing coordinator against sites that add distributed noise: run 2 is
    not refused but charged; the difference of the two sums is not D's histograms (a noisy
    estimate whose error the budget bounds); a third run past the site's total budget is
    refused at the announcement, before anything is scored."""
    import numpy as np

    from client.ledger import ReleaseLedger
    from client.node_config import parse_node_config
    from client.task import score_one

    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        histogram={"bins": 16, "lo": -4.0, "hi": 4.0},
        privacy={"mode": "distributed", "epsilon": 4.0},
    ).with_fingerprints()
    from common.dp.accounting import calibrate, epsilon_of

    terms = recipe.privacy_terms(4)
    cal = calibrate(terms)
    rho1 = cal.rho_release

    def eps(releases: int) -> float:
        return epsilon_of([cal.charges(releases)], 1e-6)[0]

    # Room for run 2's announcement (2 + 11 releases) but not run 3's (4 + 11).
    budget = 0.5 * (eps(13) + eps(15))
    configs = _four_sites(tiny_parents, tmp_path, privacy="distributed",
                          **{"max-epsilon-total": budget})
    first, _ = _one_run(tiny_parents, configs, recipe, [101, 102, 103, 104])
    second, scored = _one_run(tiny_parents, configs, recipe, [101, 102, 103])
    assert first is not None and second is not None, scored.failed
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=4)
    d = [score_one(parse_node_config(configs[104]), instr, i) for i in range(2)]
    diff = np.concatenate([first[c][k] - second[c][k] for c in range(2) for k in range(2)])
    exact = np.concatenate([d[c][k] for c in range(2) for k in range(2)])
    assert not np.array_equal(diff, exact)
    # And not merely off somewhere: the error has the spread of the noise both sums carry
    # (run 1: four sites' shares for 3 honest of 4; run 2: three sites' for 2 of 3), over
    # the 64 counts (2 candidates × 2 classes × 16 bins).
    sd = math.sqrt(4 * cal.sigma_site**2 + 3 * calibrate(recipe.privacy_terms(3)).sigma_site**2)
    assert 0.5 < float(np.std(diff - exact)) / sd < 2.0
    # Each of A, B, C was charged twice: two releases of 2 candidates, ρ each = 2 ρ_release.
    for i in range(3):
        ledger = ReleaseLedger(tmp_path / f"site-{i}.jsonl")
        assert [e.rho for e in ledger.entries()] == pytest.approx([2 * rho1] * 2)
        assert [e.sigma for e in ledger.entries()] == [cal.sigma_total] * 2
        # (Run 2 assumed 2 honest sites of 3, run 1 three of 4: their τ differ, below 1e-9.)
        assert ledger.spent_epsilon(1e-6) == pytest.approx(eps(4), rel=1e-9)
    # A third run could cost 11 more releases of the fold: past the budget in total.
    grid = _grid(tiny_parents, configs={n: configs[n] for n in (101, 102, 103)})
    accepted, refusals = announce(grid, recipe, [101, 102, 103])
    assert not accepted
    assert {r["reason"] for r in refusals} == {"dp:budget-exhausted"}


@pytest.mark.adversarial
def test_probing_the_policy_is_rate_limited(tiny_parents, recipe):
    """A coordinator that re-announces to probe a site's rules gets `policy:announcement-rate`
    once the site's hourly cap is spent, before any data is loaded; an hour later it answers."""
    from client.client_app import _AnnouncementRate

    configs = _configs(tiny_parents, **{"max-announcements-per-hour": 2})
    grid = _grid(tiny_parents, configs=configs)
    for _ in range(2):
        accepted, refusals = announce(grid, recipe, NODES)
        assert sorted(accepted) == NODES and refusals == []
    accepted, refusals = announce(grid, recipe, NODES)
    assert not accepted
    assert {r["reason"] for r in refusals} == {"policy:announcement-rate"}
    rate = _AnnouncementRate()
    assert rate.admit("a", 1, now=0.0) and not rate.admit("a", 1, now=10.0)
    assert rate.admit("a", 1, now=3601.0)


@pytest.mark.adversarial
@pytest.mark.parametrize("honest", [4, 50], ids=["more-than-announced", "fifty-of-three"])
def test_a_coordinator_cannot_shrink_the_noise_by_claiming_honest_sites(tiny_parents, recipe,
                                                                        honest):
    """Distributed noise is split over the honest sites the run claims: claiming more than a
    strict majority (2) of the 3 announced sites would have each site add too little. Refused
    before scoring."""
    grid = _grid(tiny_parents, tamper=_edit_request(
        None, lambda d: d["privacy"].update(honest_sites=honest)))
    accepted, _ = announce(grid, recipe, NODES)
    assert not accepted
    assert set(_codes(grid).values()) == {"dp:honest-sites-above-policy"}
    _still_serves(grid, recipe)


@pytest.mark.adversarial
@pytest.mark.parametrize("edit", [{"epsilon": 16.0}, {"delta": 1e-4}], ids=["epsilon", "delta"])
def test_a_coordinator_cannot_spend_more_than_the_site_allows_per_run(tiny_parents, recipe,
                                                                      edit):
    """Less noise by asking for a larger ε (or δ) than the site's per-run cap (8, 1e-6 by
    default): refused at the announcement, before anything is scored."""
    grid = _grid(tiny_parents, tamper=_edit_request(None, lambda d: d["privacy"].update(edit)))
    accepted, _ = announce(grid, recipe, NODES)
    assert not accepted
    assert set(_codes(grid).values()) == {"dp:epsilon-above-policy"}
    _still_serves(grid, recipe)


@pytest.mark.adversarial
def test_a_coordinator_cannot_release_more_than_the_noise_was_calibrated_for(tiny_parents,
                                                                             recipe):
    """The announcement says one release per fold (so the sites calibrate little noise); the
    round then asks to release two candidates. Every site refuses at the release, after
    scoring, before its vector leaves: `dp:releases-exhausted`."""
    from flwr.app import Context, RecordDict

    from common.errors import FedmergeError
    from server.secagg import secure_round

    grid = _grid(tiny_parents, tamper=_edit_request(
        None, lambda d: d["privacy"].update(releases=1)))
    accepted, refusals = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES and not refusals
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3)
    instr = instr.model_copy(update={"privacy": instr.privacy.model_copy(update={"releases": 1})})
    assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(FedmergeError):
        secure_round(grid, ctx, node_ids=NODES, instructions=instr, settings=recipe.secagg)
    assert set(_codes(grid).values()) == {"dp:releases-exhausted"}


@pytest.mark.adversarial
def test_a_round_outside_the_public_merge_family_is_refused(tiny_parents, recipe):
    """λ outside [0, 1] extrapolates past a parent: a model that neither public parent nor
    any published merge of them describes. A coordinator that slips one into a round is
    refused before anything is scored, and the node keeps serving."""
    def edit(d):
        if "candidates" in d:
            d["candidates"] = [0.5, 1.5]

    grid = _grid(tiny_parents, tamper=_edit_request(None, edit))
    accepted, _ = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.5, 0.7], sites=3)
    scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
    assert not scored.ready
    assert {Refusal.from_reason(r).reason for r in scored.failed.values()} == {
        "policy:lambda-range"}
    _still_serves(grid, recipe)


# A coordinator that deviates to get past a site's minimums (min_cohort, min_sites) and its
# parent fingerprints. Each rule is first shown to be what the attacker must get past (where
# an honest coordinator meets it), then the deviation is refused with the rule's code before
# anything of the site is scored or released.


Tamper = Callable[[Message], Message]


def _chain(*tampers: Tamper) -> Tamper:
    """Several rewrites of what the sites receive, applied in order."""

    def tamper(msg: Message) -> Message:
        for t in tampers:
            msg = t(msg)
        return msg

    return tamper


def _in_announcement(edit: Callable[[dict], object]) -> Callable[[dict], None]:
    """An edit of the announcement only (it alone names `score_folds`), not of the rounds."""

    def apply(d: dict) -> None:
        if "score_folds" in d:
            edit(d)

    return apply


def _secure_sum(grid: CoordinatorGrid, nodes: list[int], instr: RoundInstructions,
                recipe: TuningRecipe, *, min_sites: int = 3) -> RoundOutcome:
    """The coordinator's SecAgg+ round over `nodes` (its own min_sites check as it chooses)."""
    from flwr.app import Context, RecordDict

    from server.secagg import secure_round

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return secure_round(grid, ctx, node_ids=nodes, instructions=instr, settings=recipe.secagg,
                        min_sites=min_sites)


def _released_nothing(grid: CoordinatorGrid, nodes: list[int], instr: RoundInstructions
                      ) -> None:
    """No masked vector of `nodes` reached the coordinator; each still holds its scored
    histograms unspent (so a later honest round could still release them, once)."""
    from adversary import masked_vector_of

    for node in nodes:
        assert masked_vector_of(grid, node, str(instr.round)) is None
        assert node_app.stored_histograms(grid.inner.contexts[node], instr)[1] is None


def _fold_size(config: dict[str, object], fold: int, folds: int) -> int:
    from client.node_cache import fold_counts
    from client.node_config import parse_node_config

    return fold_counts(parse_node_config(config), fold, folds, 0, False)[0]


@pytest.mark.parametrize("attack", ["tiny-folds", "unannounced-fold", "fold-past-the-count"])
def test_a_fold_under_the_min_cohort_is_never_scored(tiny_parents: tuple[Path, Path],
                                                     recipe: TuningRecipe, attack: str) -> None:
    """`tiny-folds`: every site accepts the announcement's 2 folds, then the round restates
    24 folds and asks fold 0 of them (0 to 2 stays a site, under min_cohort = 5): one
    patient's histograms at site 101. `unannounced-fold`: site 102 refuses its fold 0 (21
    stays) at the announcement by min_cohort; the coordinator re-announces to it only its
    fold 1 (27 stays, accepted), then asks fold 0. The round is held to what was accepted
    (whose folds were counted against min_cohort): refused before anything is scored.
    `fold-past-the-count`: fold 7 of 2, which no site can count: refused under the same rule
    (it answered `site:data-unavailable`, a failure, while the fold was counted first)."""
    configs = _configs(tiny_parents)
    if attack == "fold-past-the-count":
        folds, fold = recipe.folds, recipe.folds + 5
        grid = _grid(tiny_parents, configs=configs)
        accepted, _ = announce(grid, recipe, NODES)
        assert sorted(accepted) == NODES
        victims = NODES
    elif attack == "tiny-folds":
        folds, fold = 24, 0
        sizes = [_fold_size(configs[n], fold, folds) for n in NODES]
        assert max(sizes) < 5  # under every site's min_cohort: what the attack would score
        grid = _grid(tiny_parents, configs=configs)
        accepted, _ = announce(grid, recipe, NODES)
        assert sorted(accepted) == NODES
        victims = NODES
    else:
        folds = recipe.folds
        sizes = [_fold_size(configs[102], f, folds) for f in range(folds)]
        fold, big = sizes.index(min(sizes)), sizes.index(max(sizes))
        assert sizes[fold] < sizes[big]
        configs[102] = {**configs[102], "min-cohort": sizes[big]}
        grid = _grid(tiny_parents, configs=configs)
        accepted, _ = announce(grid, recipe, NODES)  # honest: the rule to get past
        assert sorted(accepted) == [101, 103] and _codes(grid) == {102: "policy:min-cohort"}
        grid.inner.tamper = _edit_request(102, _in_announcement(
            lambda d: d.update(score_folds=[big])))
        accepted, _ = announce(grid, recipe, NODES)
        assert sorted(accepted) == NODES
        victims = [102]
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3)
    instr = instr.model_copy(update={"folds": folds, "fold": fold})
    scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
    assert scored.ready == [n for n in NODES if n not in victims]
    assert {n: Refusal.from_reason(r).reason for n, r in scored.failed.items()} == {
        n: "round:differs-from-announcement" for n in victims}
    for node in victims:  # nothing scored: no histograms of the small fold exist
        assert node_app.stored_histograms(grid.inner.contexts[node], instr)[1] == (
            "round:not-scored")


@pytest.mark.parametrize("round_says", [2, 3], ids=["round-says-two", "round-claims-three"])
def test_two_of_three_announced_sites_are_never_summed(tiny_parents: tuple[Path, Path],
                                                       recipe: TuningRecipe,
                                                       round_says: int) -> None:
    """Three sites accept (min_sites = 3 met); the coordinator then runs the round over two
    of them, skipping its own min_sites check. Told so (`sites: 2`), both refuse before
    scoring. Lied to (`sites: 3`, as announced), they cannot see the roster while scoring,
    so they score, and refuse at SecAgg+ setup, where the sampled count is Flower's own:
    neither vector leaves."""
    from common.errors import RunStopped

    grid = _grid(tiny_parents)
    accepted, _ = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES
    two = [101, 102]
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75],
                                      sites=round_says, announced_sites=3)
    scored = score_round(grid, two, instr, timeout_per_candidate=60)
    if round_says == 2:
        assert scored.ready == []
        assert {n: Refusal.from_reason(r).reason for n, r in scored.failed.items()} == {
            101: "policy:min-sites", 102: "policy:min-sites"}
        for node in two:
            assert node_app.stored_histograms(grid.inner.contexts[node], instr)[1] == (
                "round:not-scored")
        return
    assert scored.ready == two
    with pytest.raises(RunStopped, match="secure aggregation halted"):
        _secure_sum(grid, two, instr, recipe, min_sites=2)
    assert _codes(grid) == {101: "secagg:too-few-sites", 102: "secagg:too-few-sites"}
    _released_nothing(grid, two, instr)


@pytest.mark.parametrize("forge_setup", [False, True], ids=["roster-of-four", "setup-of-four"])
def test_a_roster_larger_than_the_sites_summed_does_not_meet_a_sites_min_sites(
        tiny_parents: tuple[Path, Path], recipe: TuningRecipe, forge_setup: bool) -> None:
    """Site 101 demands 4 sites; three exist, so an honest announcement is refused. The
    coordinator announces (and has every round restate) a roster of four, which passes
    every check a site can make on claims, then sums the three. `roster-of-four`: SecAgg+'s
    sampled count (3) is refused at setup. `setup-of-four`: the coordinator also writes 4
    sites (threshold 4) into 101's setup; key sharing then brings 3 key holders, fewer than
    that threshold, and 101 refuses before any share of its secrets leaves. Adding a 4th
    node of its own (a Sybil) is the documented limit of this check (README)."""
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    from common.errors import RunStopped

    configs = _configs(tiny_parents)
    configs[101] = {**configs[101], "min-sites": 4}
    grid = _grid(tiny_parents, configs=configs)
    announce(grid, recipe, NODES)  # honest: the rule to get past
    assert _codes(grid) == {101: "policy:min-sites"}

    def setup_of_four(msg: Message) -> Message:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (forge_setup and msg.metadata.dst_node_id == 101 and cfg is not None
                and cfg.get(Key.STAGE) == Stage.SETUP):
            for key in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD):
                cfg[key] = 4
        return msg

    grid = _grid(tiny_parents, configs=configs, tamper=_chain(
        _edit_request(None, _in_announcement(lambda d: d.update(sites=4))), setup_of_four))
    accepted, _ = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=4,
                                      announced_sites=3)  # terms as announced, roster of 4
    assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES
    with pytest.raises(RunStopped, match="secure aggregation halted"):
        _secure_sum(grid, NODES, instr, recipe)
    rule = "secagg:share-keys-invalid" if forge_setup else "secagg:too-few-sites"
    assert _codes(grid) == {101: rule}
    _released_nothing(grid, [101], instr)


def test_an_inflated_roster_cannot_thin_the_distributed_noise(tiny_parents: tuple[Path, Path],
                                                              recipe: TuningRecipe) -> None:
    """Distributed noise is split over the honest sites the run assumes, at most a strict
    majority of the ANNOUNCED sites. The coordinator announces nine sites (five assumed
    honest: each site adds σ/√5) to the three that exist and sums those three: the sum
    would carry 3/5 of the variance ε was calibrated for. Every check on claims passes
    (min_sites, honest sites ≤ 9 // 2 + 1); each site's guard raises its minimum sum to the
    five assumed honest and refuses SecAgg+ setup with three."""
    from common.dp.accounting import calibrate
    from common.errors import RunStopped

    def nine_sites(d: dict) -> None:
        d["sites"] = 9
        d["privacy"]["honest_sites"] = 5

    grid = _grid(tiny_parents, tamper=_edit_request(None, _in_announcement(nine_sites)))
    accepted, refusals = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES and not refusals
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3,
                                      announced_sites=9)
    cal = calibrate(instr.privacy)
    assert instr.privacy.honest_sites == 5
    assert cal.noise_variance(3) == pytest.approx(0.6 * cal.sigma_total**2)  # what is at stake
    assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES
    with pytest.raises(RunStopped, match="secure aggregation halted"):
        _secure_sum(grid, NODES, instr, recipe)
    assert _codes(grid) == {n: "secagg:too-few-sites" for n in NODES}
    _released_nothing(grid, NODES, instr)


def test_a_coordinator_of_another_protocol_version_is_refused_at_once(
        tiny_parents: tuple[Path, Path], recipe: TuningRecipe) -> None:
    """Masks are bound to the round since protocol 2: ends of different versions would score,
    spend budget, then fail to unmask together. A site refuses such a coordinator at the
    announcement, before its data is loaded."""
    from common.protocol import PROTOCOL_VERSION

    assert recipe.terms(3)["protocol"] == PROTOCOL_VERSION == 2
    grid = _grid(tiny_parents, tamper=_edit_request(None, _in_announcement(
        lambda d: d.update(protocol=1))))
    accepted, _ = announce(grid, recipe, NODES)
    assert accepted == {}
    assert _codes(grid) == {n: "policy:protocol-version" for n in NODES}
    _still_serves(grid, recipe)


def test_a_run_cannot_lower_its_noise_minimum_by_announcing_again(
        tiny_parents: tuple[Path, Path], recipe: TuningRecipe) -> None:
    """The inflated roster again, now with a second announcement between scoring and SecAgg+:
    a round is scored under nine announced sites (five assumed honest, each site's noise
    σ/√5), then an honest-looking three-site announcement would lower the guard's minimum
    sum to the two it assumes, and a setup forged to say five sites would release a sum of
    three carrying 3/5 of the variance ε was set for (it did). A run keeps the announcement
    it started with: the second is refused, and so is the setup."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from common.errors import RunStopped

    inflated = {"on": True}

    def nine_sites(d: dict) -> None:
        if inflated["on"]:
            d["sites"] = 9
            d["privacy"]["honest_sites"] = 5

    inflate = _edit_request(None, _in_announcement(nine_sites))

    def setup_says_five(msg: Message) -> Message:
        msg = inflate(msg)
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and cfg.get(Key.STAGE) == Stage.SETUP:
            cfg[Key.SAMPLE_NUMBER] = 5  # shares and threshold 3, as the workflow sets them
        return msg

    grid = _grid(tiny_parents, tamper=setup_says_five)
    accepted, refusals = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES and not refusals
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3,
                                      announced_sites=9)
    assert instr.privacy.honest_sites == 5
    assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES
    inflated["on"] = False
    accepted, _ = announce(grid, recipe, NODES)
    assert accepted == {}
    assert _codes(grid) == {n: "policy:announcement-changed" for n in NODES}
    with pytest.raises(RunStopped, match="secure aggregation halted"):
        _secure_sum(grid, NODES, instr, recipe)
    assert _codes(grid) == {n: "secagg:threshold-below-policy" for n in NODES}
    _released_nothing(grid, NODES, instr)


def test_sites_told_different_terms_do_not_sum(tiny_parents: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """Sites never see one another's messages. A coordinator tells site 101 ε = 1 and the
    two others ε = 8, in every message: each site's checks pass and each adds the noise of its
    own ε, so the sum carried far less noise than 101 was charged for (sd 10.1 against σ 14.0
    charged: 1.4 times the ε). Masks are bound to the round's instructions as each site saw
    them: 101's pairwise masks then do not cancel against the others', and the sum the
    coordinator unmasks is uniformly random, nowhere near anyone's counts."""
    import json

    import numpy as np

    from client.node_config import parse_node_config
    from client.task import score_one
    from common.dp.accounting import calibrate
    from common.errors import FedmergeError

    victim = 101

    def eps_8(obj: object) -> None:
        if isinstance(obj, dict):
            if isinstance(obj.get("privacy"), dict):
                obj["privacy"]["epsilon"] = 8.0
            for value in obj.values():
                eps_8(value)

    def others_told_eps_8(msg: Message) -> Message:
        if msg.metadata.dst_node_id == victim:
            return msg
        for name, rec in list(msg.content.config_records.items()):
            changed = {}
            for k, v in rec.items():
                if isinstance(v, str) and v.startswith("{") and "privacy" in v:
                    d = json.loads(v)
                    eps_8(d)
                    changed[k] = json.dumps(d)
            if changed:
                msg.content.config_records[name] = ConfigRecord({**dict(rec), **changed})
        return msg

    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        search={"grid_points": 11}, privacy={"mode": "distributed", "epsilon": 1.0},
    ).with_fingerprints()
    configs = _configs(tiny_parents)
    grid = _grid(tiny_parents, tamper=others_told_eps_8, configs=configs)
    accepted, refusals = announce(grid, recipe, NODES)
    assert sorted(accepted) == NODES and not refusals
    candidates = [i / 10 for i in range(11)]
    instr = recipe.round_instructions(round=1, stage="tune", candidates=candidates, sites=3)
    assert score_round(grid, NODES, instr, timeout_per_candidate=120).ready == NODES
    truth = sum(
        np.concatenate([np.concatenate(score_one(parse_node_config(configs[n]), instr, i))
                        for i in range(len(candidates))])
        for n in NODES
    )
    sigma = calibrate(instr.privacy).sigma_total
    assert sigma > 14.0
    assert int(truth.max()) < 100  # what a decoded sum would have been near
    # Unbound, the round decoded: its error had sd 10.1 (0.72 σ). Bound, the words the
    # coordinator unmasks are uniform over the 2^32 modulus: not sums of integers over three
    # sites, nor within what three sites can send, and its decoding says why.
    with pytest.raises(FedmergeError, match="the masks did not cancel"):
        _secure_sum(grid, NODES, instr, recipe)


def test_the_same_announcement_again_keeps_the_runs_release_count(
        tiny_parents: tuple[Path, Path], tmp_path: Path) -> None:
    """Noise is calibrated for the candidates a run announces per fold (3 here, ε = 8). A
    coordinator that announces the same terms again before each round would start the count
    again (it did: three rounds of three went out in one run, ε 15.7 against the per-run cap
    of 8). The second round of the fold is refused, and the ledger shows one release."""
    from client.ledger import ReleaseLedger
    from common.errors import FedmergeError

    a, b = tiny_parents
    recipe = TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear", scoring={"max_patient_tokens": 64},
        search={"grid_points": 3, "max_candidates_per_round": 3},
        privacy={"mode": "distributed", "epsilon": 8.0},
    ).with_fingerprints()
    configs = _configs(tiny_parents)
    for n in NODES:
        configs[n]["ledger"] = str(tmp_path / f"{n}.jsonl")
    grid = _grid(tiny_parents, configs=configs)
    for rnd, candidates in ((1, [0.1, 0.5, 0.9]), (2, [0.2, 0.6, 0.8])):
        accepted, _ = announce(grid, recipe, NODES)
        assert sorted(accepted) == NODES
        instr = recipe.round_instructions(round=rnd, stage="tune", candidates=candidates,
                                          sites=3)
        assert score_round(grid, NODES, instr, timeout_per_candidate=60).ready == NODES
        if rnd == 1:
            _secure_sum(grid, NODES, instr, recipe)
    with pytest.raises(FedmergeError):
        _secure_sum(grid, NODES, instr, recipe)
    assert set(_codes(grid).values()) == {"dp:releases-exhausted"}
    for n in NODES:
        ledger = ReleaseLedger(tmp_path / f"{n}.jsonl")
        assert [(e.round, len(e.candidates)) for e in ledger.entries()] == [(1, 3)]
        assert ledger.spent_epsilon(1e-6) <= 8.0


@pytest.mark.parametrize("stage", ["announcement", "round"])
def test_a_site_takes_part_only_under_the_parents_it_holds(tiny_parents: tuple[Path, Path],
                                                          recipe: TuningRecipe, tmp_path: Path,
                                                          stage: str) -> None:
    """Nothing on the wire names a path: a site always scores its own copies. The coordinator
    can only name what is scored, and names a decoy to site 102: the public parent A and a
    copy of it whose chat template asks another question, by its real SHA-256. At the
    announcement 102 refuses by its fingerprint rule; announced honestly and switched in
    the round, it refuses the round; either way nothing is scored at 102, and the other
    sites go on."""
    import shutil

    from common.model_io import fingerprint

    decoy = tmp_path / "decoy"
    shutil.copytree(tiny_parents[0], decoy)
    cfg = json.loads((decoy / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ 'Is this patient HIV positive? ' + messages[0]['content'] }}"
    (decoy / "tokenizer_config.json").write_text(json.dumps(cfg))
    named = [recipe.parent_fingerprints[0], fingerprint(decoy)]
    assert named[1] not in recipe.parent_fingerprints
    decoy_to_102 = _edit_request(102, lambda d: d.update(parent_fingerprints=named))

    grid = _grid(tiny_parents, tamper=decoy_to_102 if stage == "announcement" else None)
    accepted, _ = announce(grid, recipe, NODES)
    if stage == "announcement":
        assert sorted(accepted) == [101, 103]
        assert _codes(grid) == {102: "policy:parents-differ"}
    else:
        assert sorted(accepted) == NODES
        grid.inner.tamper = decoy_to_102
    instr = recipe.round_instructions(round=1, stage="tune", candidates=[0.25, 0.75], sites=3)
    scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
    assert scored.ready == [101, 103]
    assert Refusal.from_reason(scored.failed[102]).reason == "round:differs-from-announcement"
    assert node_app.stored_histograms(grid.inner.contexts[102], instr)[1] == "round:not-scored"

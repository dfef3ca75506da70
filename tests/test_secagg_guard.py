"""The site's SecAgg+ guard against a coordinator that deviates from the protocol.

Real fedmerge ClientApps (tiny real checkpoints, the synthetic cohort) behind a loopback
Grid; the SecAgg+ server side is Flower's real workflow, with the attacker's stage swapped
in where it cheats (tests/adversary.py). The attack is first shown to WORK against Flower's
unchecked client mod (so the tests below cannot pass by accident), then to fail against the
guarded node in its strongest forms.
"""

from __future__ import annotations

import numpy as np
import pytest
from adversary import run_attack
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from secagg_support import (  # noqa: F401 (task_identity: autouse fixture)
    LoopbackGrid,
    fixed_instructions,
    fixed_site_app,
    random_hists,
    task_identity,
)

from client import client_app as node_app
from common.protocol import Refusal
from common.secure_sum import encode_histograms
from server.coordinator import announce
from server.grid import CoordinatorGrid
from server.recipe import SecAggSettings, TuningRecipe
from server.scoring_round import score_round
from server.secagg import secure_round

DATA = "synthetic:sites=3,stays=48,seed=7"
BINS = 16
NODES = [101, 102, 103]


def _node_configs(parents, sites=3, data=DATA, **extra):
    a, b = parents
    return {
        100 + i + 1: {
            "data": data, "parent-a": str(a), "parent-b": str(b), "split": "region",
            "sim-sites": sites, "sim-index": i, "min-cohort": 5, "min-positives": 1,
            "bins": BINS, "lo": -4.0, "hi": 4.0, **extra,
        }
        for i in range(sites)
    }


def _unguarded_app() -> ClientApp:
    """fedmerge's handlers behind Flower's SecAgg+ client mod as shipped (no guard)."""
    from flwr.client.mod import secaggplus_mod

    from common.secure_masks import install

    app = ClientApp()

    def flower_mod(msg, ctx, call_next):
        install()
        return secaggplus_mod(msg, ctx, call_next)

    def cfg(ctx: Context):
        return node_app.resolve_node_config(ctx)

    @app.query()
    def query(msg, ctx):
        return node_app.handle_announcement(msg, ctx, cfg(ctx))

    @app.query("score")
    def score(msg, ctx):
        return node_app.handle_score(msg, ctx, cfg(ctx))

    @app.train(mods=[flower_mod])
    def train(msg, ctx):
        return node_app.handle_round(msg, ctx, cfg(ctx))

    return app


@pytest.fixture(scope="module")
def recipe(tiny_parents):
    a, b = tiny_parents
    return TuningRecipe(
        parent_a=str(a), parent_b=str(b), method="linear",
        histogram={"bins": BINS, "lo": -4.0, "hi": 4.0},
        scoring={"max_patient_tokens": 64},
    ).with_fingerprints()


def _scored_sites(tiny_parents, recipe, *, guarded: bool, round_no: int = 1, tamper=None,
                  **node_extra):
    """Three real sites that accepted the recipe and hold round `round_no`'s histograms."""
    configs = _node_configs(tiny_parents, **node_extra)
    apps = {n: (node_app.make_client_app() if guarded else _unguarded_app()) for n in configs}
    grid = CoordinatorGrid(LoopbackGrid(apps, configs, tamper=tamper))
    accepted, refusals = announce(grid, recipe, sorted(apps))
    assert sorted(accepted) == NODES and not refusals
    instr = recipe.round_instructions(round=round_no, stage="tune", candidates=[0.25, 0.75],
                                      sites=3)
    scored = score_round(grid, NODES, instr, timeout_per_candidate=60)
    assert scored.ready == NODES, scored
    return grid, instr


def _plaintext(grid, node, instr) -> np.ndarray:
    ctx = grid.inner.contexts[node]
    hists, _ = node_app.stored_histograms(ctx, instr)
    if hists is None:  # already released: read the arrays directly
        arrays = ctx.state.array_records[node_app.SCORED_ARRAYS]
        hists = [(arrays[str(i)].numpy()[:BINS], arrays[str(i)].numpy()[BINS:])
                 for i in range(len(instr.candidates))]
    return encode_histograms(hists, BINS)


@pytest.mark.adversarial
def test_the_attack_reads_a_site_through_flowers_unchecked_mod(tiny_parents, recipe):
    """Control: against Flower's mod as shipped, the coordinator rebuilds site 101 exactly
    (exact sums: with differential privacy on it would rebuild a noisy release instead)."""
    from server.recipe import PrivacyRecipe

    recipe = recipe.model_copy(update={"privacy": PrivacyRecipe(mode="off")})
    grid, instr = _scored_sites(tiny_parents, recipe, guarded=False, privacy="off")
    target = NODES[0]
    recovered, shares = run_attack(grid, NODES, instr, target=target, split=False,
                                   threshold=0.67)
    assert shares == (2, 2)
    np.testing.assert_array_equal(recovered, _plaintext(grid, target, instr))


@pytest.mark.adversarial
@pytest.mark.parametrize("split", [False, True], ids=["one-list", "split-lists"])
@pytest.mark.parametrize("threshold", [0.67, 3], ids=["flower-default", "policy-threshold"])
def test_a_guarded_site_never_releases_both_shares(tiny_parents, recipe, split, threshold):
    grid, instr = _scored_sites(tiny_parents, recipe, guarded=True)
    target = NODES[0]
    recovered, (seed_shares, key_shares) = run_attack(
        grid, NODES, instr, target=target, split=split, threshold=threshold
    )
    assert recovered is None
    # Never both kinds of share of one site from enough sites to rebuild it.
    assert min(seed_shares, key_shares) < 3
    if threshold == 0.67:  # 2 of 3: below every site's policy, refused before any key moved
        assert (seed_shares, key_shares) == (0, 0)
        reasons = {Refusal.from_reason(m.error.reason).reason
                   for m in grid.received if m.has_error()}
        assert reasons == {"secagg:threshold-below-policy"}


@pytest.mark.adversarial
@pytest.mark.parametrize("guarded", [False, True], ids=["flower-mod", "guarded"])
def test_split_unmask_lists_read_a_site_only_below_a_strict_majority(guarded):
    """The split-lists attack where it can work: five sites, a threshold of 2. Two of the four
    other sites are told the target is active (each returns a share of its mask seed), two
    that it is dead (a share of its pairwise key); each half reaches the threshold, and
    against Flower's mod the coordinator rebuilds the target exactly. The guard refuses any
    threshold below a strict majority at SETUP, so no two disjoint halves can both reach it
    (with three sites at a threshold of 3, as above, the halves could not reach it anyway)."""
    from flwr.client.mod import secaggplus_mod
    from secagg_support import SITE_GUARD

    rng = np.random.default_rng(5)
    hists = [random_hists(rng, 2, 40) for _ in range(5)]
    apps = {200 + i: fixed_site_app(h, mod=SITE_GUARD if guarded else secaggplus_mod)
            for i, h in enumerate(hists)}
    grid = CoordinatorGrid(LoopbackGrid(apps))
    nodes = sorted(apps)
    recovered, shares = run_attack(grid, nodes, fixed_instructions(2), target=nodes[0],
                                   split=True, threshold=2)
    if not guarded:
        assert shares == (2, 2)
        np.testing.assert_array_equal(recovered, encode_histograms(hists[0], BINS))
        return
    assert recovered is None and shares == (0, 0)
    assert {Refusal.from_reason(m.error.reason).reason
            for m in grid.received if m.has_error()} == {"secagg:threshold-below-policy"}


def _tamper_unmask(target: int, edit):
    def tamper(msg: Message) -> Message:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (cfg is not None and cfg.get(Key.STAGE) == Stage.UNMASK
                and msg.metadata.dst_node_id == target):
            edit(cfg, msg.metadata.dst_node_id)
        return msg

    return tamper


def _five_fixed_sites(tamper=None):
    """Five sites with fixed histograms behind the guard (no model): for protocol checks."""
    rng = np.random.default_rng(11)
    hists = [random_hists(rng, 2, 40) for _ in range(5)]
    apps = {200 + i: fixed_site_app(h) for i, h in enumerate(hists)}
    return CoordinatorGrid(LoopbackGrid(apps, tamper=tamper)), hists, fixed_instructions(2)


def _ctx():
    from flwr.app import RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.adversarial
@pytest.mark.parametrize(
    "edit,rule",
    [
        (lambda cfg, me: cfg.__setitem__(Key.DEAD_NODE_ID_LIST, [200]),
         "secagg:unmask-active-and-dead"),
        (lambda cfg, me: (cfg.__setitem__(Key.DEAD_NODE_ID_LIST, [me]),
                          cfg.__setitem__(Key.ACTIVE_NODE_ID_LIST,
                                          [n for n in cfg[Key.ACTIVE_NODE_ID_LIST] if n != me])),
         "secagg:unmask-lists-this-site-dead"),
        (lambda cfg, me: cfg.__setitem__(Key.ACTIVE_NODE_ID_LIST, [me, 200]),
         "secagg:unmask-too-few-active"),
        (lambda cfg, me: cfg.__setitem__(Key.DEAD_NODE_ID_LIST, [999]),
         "secagg:unmask-unknown-site"),
    ],
    ids=["active-and-dead", "self-dead", "too-few-active", "unknown-site"],
)
def test_unmask_requests_that_break_the_rules_are_refused(edit, rule):
    """One site gets a forged UNMASK: it refuses with the rule's code and releases nothing;
    the round still completes from the honest sites' shares, with the exact sum."""
    victim = 203
    grid, hists, instr = _five_fixed_sites(tamper=_tamper_unmask(victim, edit))
    out = secure_round(grid, _ctx(), node_ids=list(range(200, 205)), instructions=instr,
                       settings=SecAggSettings(timeout=5.0))
    assert Refusal.from_reason(out.failures[victim]).reason == rule
    for c in range(2):
        for k in range(2):
            np.testing.assert_array_equal(out.histograms[c][k], sum(h[c][k] for h in hists))
    # The refusing site released no share: its reply is an error, not a share list.
    replies = [m for m in grid.received if m.metadata.src_node_id == victim
               and not m.has_error()
               and Key.SHARE_LIST in m.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert replies == []
    # ... and it starts the next round clean: an honest round over the same sites is exact.
    grid.inner.tamper = None
    again = secure_round(grid, _ctx(), node_ids=list(range(200, 205)),
                         instructions=instr.model_copy(update={"round": 2}),
                         settings=SecAggSettings(timeout=5.0))
    assert sorted(again.contributors) == list(range(200, 205)) and not again.failures


@pytest.mark.adversarial
@pytest.mark.parametrize(
    "setup_edit,rule",
    [
        ({Key.THRESHOLD: 2}, "secagg:threshold-below-policy"),  # 2 of 5: no majority
        ({Key.SHARE_NUMBER: 9}, "secagg:threshold-below-policy"),  # more shares than sites
        ({Key.SAMPLE_NUMBER: 2, Key.THRESHOLD: 2, Key.SHARE_NUMBER: 2},
         "secagg:too-few-sites"),
    ],
    ids=["low-threshold", "extra-shares", "two-sites"],
)
def test_setups_below_the_site_policy_are_refused_before_any_key_moves(setup_edit, rule):
    def tamper(msg: Message) -> Message:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and cfg.get(Key.STAGE) == Stage.SETUP:
            for k, v in setup_edit.items():
                cfg[k] = v
        return msg

    from common.errors import FedmergeError

    grid, _, instr = _five_fixed_sites(tamper=tamper)
    with pytest.raises(FedmergeError, match=rule.replace("+", r"\+")):
        secure_round(grid, _ctx(), node_ids=list(range(200, 205)), instructions=instr,
                     settings=SecAggSettings(timeout=5.0))
    assert not any(Key.PUBLIC_KEY_1 in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
                   for m in grid.received if not m.has_error())


@pytest.mark.adversarial
def test_a_scored_round_is_released_once(tiny_parents, recipe):
    """Summing the same instructions twice over different sets of sites would isolate a
    site by difference: the second request is refused at the masked-vector stage."""
    from common.errors import FedmergeError

    grid, instr = _scored_sites(tiny_parents, recipe, guarded=True)
    first = secure_round(grid, _ctx(), node_ids=NODES, instructions=instr,
                         settings=SecAggSettings(timeout=10.0))
    assert first.contributors == NODES
    with pytest.raises(FedmergeError, match="round:already-released"):
        secure_round(grid, _ctx(), node_ids=NODES, instructions=instr,
                     settings=SecAggSettings(timeout=10.0))

"""The site's SecAgg+ guard against a coordinator that deviates from the protocol.

Real fedmerge ClientApps (tiny real checkpoints, the synthetic cohort) behind a loopback
Grid; the SecAgg+ server side is Flower's real workflow, with the attacker's stage swapped
in where it cheats (tests/adversary.py). The attack is first shown to WORK against Flower's
unchecked client mod (so the tests below cannot pass by accident), then to fail against the
guarded node in its strongest forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.clientapp.typing import ClientAppCallable

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


def _keeps_its_secrets(msg: Message, context: Context, call_next: ClientAppCallable
                       ) -> Message:
    """A colluding site's mod: Flower's own SecAgg+ mod (fedmerge's X25519 installed), which
    leaves every secret of the round in the node's state afterwards (the guard wipes it)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from client.secagg_guard import masks_bound_to_round
    from common.secure_masks import install

    install()
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    masking = cfg is not None and cfg.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
    with masks_bound_to_round(msg, masking):  # it follows the protocol, masks included
        return secaggplus_mod(msg, context, call_next)


def _secaggplus_state(context: Context) -> SecAggPlusState | None:
    """The site's SecAgg+ state as Flower's mod stores it in the node's Context (None when
    empty, as the guard leaves it after UNMASK)."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    record = context.state.config_records.get(RECORD_KEY_STATE)
    return SecAggPlusState(**record) if record and record.get("sk1") else None


@pytest.mark.adversarial
def test_a_coordinator_colluding_with_one_site_cannot_read_shares_between_two_others() -> None:
    """README's privacy table says other hospitals learn "nothing of each other (shares travel
    encrypted)" while the coordinator relays, and keeps, every SecAgg+ message. Here a real
    4-site round (Flower's SecAggPlusWorkflow through fedmerge's `secure_round`, fedmerge's
    site guard, fedmerge's X25519 agreement installed as the project installs it) runs to an
    exact sum; then the coordinator colludes with site C (which ran Flower's own mod and so
    still holds its round secrets) and attacks the shares site A sent site B at SHARE_KEYS:
    (1) positive control: B's own key opens the ciphertext, and what it holds are real Shamir
    shares of A's mask seed and pairwise key (combined with the other recipients' they give
    exactly A's `rd_seed` and `sk1`), so the test is about the secrets that matter;
    (2) every key the colluders can derive (C's two secret keys with either public key of A,
    B or D; the coordinator itself holds no secret key) fails Fernet's authentication on it,
    while C's key does open what A sent C (the colluders' keys are real, they are the wrong
    ones); the same holds for every ciphertext between honest sites;
    (3) neither the plaintext nor either share appears in the ciphertext or anywhere the
    coordinator relayed at SHARE_KEYS and COLLECT_MASKED_VECTORS (at UNMASK, B releases A's
    seed share by design: A is active, its self-mask must come off the sum)."""
    import base64
    import importlib

    from cryptography.fernet import InvalidToken
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    from flwr.common.serde import message_to_proto
    from secagg_support import SITE_GUARD

    from common import secure_keys

    rng = np.random.default_rng(23)
    nodes = [301, 302, 303, 304]
    site_a, site_b, site_c, site_d = nodes
    honest = [site_a, site_b, site_d]
    hists = {n: random_hists(rng, 2, 40) for n in nodes}
    apps = {n: fixed_site_app(hists[n], mod=_keeps_its_secrets if n == site_c else SITE_GUARD)
            for n in nodes}
    loop = LoopbackGrid(apps)
    # Ground truth for the positive control only: each honest site's secrets as its state held
    # them before the guard wiped it at UNMASK. The attack never reads these.
    truth: dict[int, SecAggPlusState] = {}

    def keep_truth(msg: Message, seconds: float, size: int) -> None:
        node = msg.metadata.dst_node_id
        state = _secaggplus_state(loop.contexts[node])
        if state is not None:
            truth[node] = state

    loop.on_deliver = keep_truth
    grid = CoordinatorGrid(loop)
    instr = fixed_instructions(2)
    out = secure_round(grid, _ctx(), node_ids=nodes, instructions=instr,
                       settings=SecAggSettings(timeout=5.0))
    assert out.contributors == nodes and not out.failures
    for c in range(2):
        for k in range(2):
            np.testing.assert_array_equal(out.histograms[c][k],
                                          sum(hists[n][c][k] for n in nodes))
    # The key agreement the sites ran is fedmerge's X25519, as `install` puts it in the mod;
    # decrypt is whatever the mod runs (Flower's Fernet).
    flower_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    assert flower_mod.generate_shared_key is secure_keys.generate_shared_key
    generate_shared_key, decrypt = flower_mod.generate_shared_key, flower_mod.decrypt
    priv, pub = secure_keys.bytes_to_private_key, secure_keys.bytes_to_public_key
    # Honest sites forgot the round (guard); the colluder's state still holds its secrets.
    assert all(_secaggplus_state(loop.contexts[n]) is None for n in honest)
    colluder = _secaggplus_state(loop.contexts[site_c])
    assert colluder is not None and len(colluder.sk1) == len(colluder.sk2) == 32

    # What the coordinator kept of SHARE_KEYS: the public keys it forwarded, the ciphertexts.
    group = str(instr.round)

    def configs(msgs: list[Message], stage: str | None = None) -> list[tuple[Message, dict]]:
        kept = []
        for m in msgs:
            if m.has_error() or m.metadata.group_id != group:
                continue
            cfg = m.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and (stage is None or cfg.get(Key.STAGE) == stage):
                kept.append((m, dict(cfg)))
        return kept

    public_keys: dict[int, tuple[bytes, bytes]] = {}
    for _, cfg in configs(grid.sent, Stage.SHARE_KEYS):
        for nid, (pk1, pk2) in ((int(k), v) for k, v in cfg.items() if k != Key.STAGE):
            assert public_keys.setdefault(nid, (pk1, pk2)) == (pk1, pk2)
    ciphertexts: dict[tuple[int, int], bytes] = {}
    for m, cfg in configs(grid.received):
        if Key.DESTINATION_LIST in cfg:
            for dst, token in zip(cfg[Key.DESTINATION_LIST], cfg[Key.CIPHERTEXT_LIST],
                                  strict=True):
                ciphertexts[(m.metadata.src_node_id, dst)] = token
    assert sorted(public_keys) == nodes
    assert sorted(ciphertexts) == [(s, d) for s in nodes for d in nodes if s != d]
    token = ciphertexts[(site_a, site_b)]

    # (1) Positive control: B's own secret key opens A's ciphertext to B...
    a, b = truth[site_a], truth[site_b]
    assert (a.threshold, a.share_num) == (3, 4)
    key_ab = generate_shared_key(priv(b.sk2), pub(public_keys[site_a][1]))
    assert key_ab == b.ss2_dict[site_a] == a.ss2_dict[site_b]
    plaintext = decrypt(key_ab, token)
    src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
    assert (src, dst) == (site_a, site_b)
    assert seed_share != a.rd_seed and key_share != a.sk1  # shares, not the secrets
    # ... and holds real shares: with two other recipients' (each opened with its own key,
    # C's with the key C holds), Flower's Shamir gives back exactly A's mask seed and key.
    opened = {site_b: (seed_share, key_share)}
    for r in (site_c, site_d):
        r_sk2 = (colluder if r == site_c else truth[r]).sk2
        r_key = generate_shared_key(priv(r_sk2), pub(public_keys[site_a][1]))
        opened[r] = share_keys_plaintext_separate(decrypt(r_key, ciphertexts[(site_a, r)]))[2:]
    own = (a.rd_seed_share_dict[site_a], a.sk1_share_dict[site_a])  # the share A kept
    for holders in ([opened[site_b], opened[site_c], opened[site_d]],
                    [opened[site_b], opened[site_d], own]):
        assert combine_shares([seed for seed, _ in holders]) == a.rd_seed
        assert combine_shares([key for _, key in holders]) == a.sk1

    # (2) Every key the colluders can derive fails on A -> B (and on every honest pair)...
    colluder_keys = [
        generate_shared_key(priv(sk), pub(pk))
        for sk in (colluder.sk1, colluder.sk2)
        for nid in honest
        for pk in public_keys[nid]
    ]
    for key in colluder_keys:
        for (s, d), ct in ciphertexts.items():
            if site_c not in (s, d):
                with pytest.raises(InvalidToken):
                    decrypt(key, ct)
    assert len(set(colluder_keys)) == 12 and key_ab not in colluder_keys
    # ... while C's key opens what A sent C: one share of A's secrets, below the threshold 3.
    key_ac = generate_shared_key(priv(colluder.sk2), pub(public_keys[site_a][1]))
    assert key_ac in colluder_keys
    got = share_keys_plaintext_separate(decrypt(key_ac, ciphertexts[(site_a, site_c)]))
    assert got == (site_a, site_c, *opened[site_c])

    # (3) The ciphertext, and all the coordinator relayed before UNMASK, carry no plaintext.
    raw = base64.urlsafe_b64decode(token)
    for secret in (plaintext, seed_share, key_share):
        assert secret not in token and secret not in raw
    relayed = [
        message_to_proto(m).SerializeToString()
        for stage_msgs in (configs(grid.sent, Stage.SHARE_KEYS),
                           configs(grid.sent, Stage.COLLECT_MASKED_VECTORS))
        for m, _ in stage_msgs
    ] + [message_to_proto(m).SerializeToString()
         for m, cfg in configs(grid.received)
         if Key.DESTINATION_LIST in cfg or Key.MASKED_PARAMETERS in cfg]
    assert len(relayed) == 16  # 4 sites x (2 requests + 2 replies)
    for wire in relayed:
        for secret in (seed_share, key_share):
            assert secret not in wire

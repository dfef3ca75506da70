"""fedmerge's Shamir is Flower's scheme, byte for byte, and is what SecAgg+ calls.

Flower's `flwr.common.secure_aggregation.crypto.shamir` (pycryptodome, pure Python) is the
reference: shares made by either implementation combine in the other, and any set of shares
(enough, too few, corrupted) gives the same bytes or the same error in both.
"""

from __future__ import annotations

import importlib
import pathlib
import random
import re

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto import shamir as flower
from secagg_support import (  # noqa: F401 (task_identity: autouse fixture)
    LoopbackGrid,
    fixed_instructions,
    fixed_site_app,
    random_hists,
    task_identity,
)

from common import secure_masks, secure_shamir
from common.secure_shamir import MAX_SHARES, combine_shares, create_shares

CHUNKS = 16


def _chunks(length: int) -> int:
    return length // CHUNKS + 1  # PKCS#7 always adds 1..16 bytes


def _case(seed: int) -> tuple[bytes, int, int]:
    """A random (secret, threshold, num): lengths 1..400 (a third of them multiples of 16),
    num up to 60, any threshold 2..num, with pycryptodome's work (chunks x num x threshold
    field products, ~10 us each) kept under ~0.1 s per sharing."""
    rng = random.Random(seed)
    while True:
        length = rng.choice([rng.randint(1, 400), 16 * rng.randint(1, 25), rng.randint(1, 48)])
        num = rng.randint(2, 60)
        threshold = rng.randint(2, num)
        if _chunks(length) * num * threshold <= 8_000:
            return rng.randbytes(length), threshold, num


def _subset(rng: random.Random, shares: list[bytes], size: int) -> list[bytes]:
    return rng.sample(shares, size)  # random members, random order


def _outcome(fn, shares):
    try:
        return fn(shares)
    except ValueError as exc:
        return ValueError, str(exc)


@pytest.mark.parametrize("seed", range(40))
def test_interchangeable_with_flower_both_ways(seed):
    secret, t, n = _case(seed)
    rng = random.Random(1000 + seed)
    ours = create_shares(secret, t, n)
    theirs = flower.create_shares(secret, t, n)
    assert [len(s) for s in ours] == [len(s) for s in theirs] == [4 + 16 * _chunks(len(secret))] * n
    assert [s[:4] for s in ours] == [s[:4] for s in theirs]  # indices 1..n, little-endian
    # Flower combines ours, we combine Flower's (pycryptodome's combine is O(m^2) per chunk:
    # at most threshold + 2 shares), and we combine ours from any subset of >= t shares.
    assert flower.combine_shares(_subset(rng, ours, min(n, t + rng.randint(0, 2)))) == secret
    assert combine_shares(_subset(rng, theirs, rng.randint(t, n))) == secret
    assert combine_shares(_subset(rng, ours, rng.randint(t, n))) == secret
    # Mixed shares of one polynomial do not exist across implementations (fresh randomness),
    # but too few shares must behave identically: same garbage or same error.
    few = _subset(rng, ours, t - 1)
    assert _outcome(combine_shares, few) == _outcome(flower.combine_shares, few)


@pytest.mark.parametrize("length", [1, 15, 16, 32, 48, 306, 400])
def test_sixty_shares_and_multiples_of_sixteen(length):
    rng = random.Random(length)
    secret = rng.randbytes(length)
    for t in (2, 31, 60):
        shares = create_shares(secret, t, 60)
        assert len(shares) == 60
        for _ in range(3):
            assert combine_shares(_subset(rng, shares, rng.randint(t, 60))) == secret
    # One full-size cross check each way (a small threshold keeps pycryptodome quick).
    ours, theirs = create_shares(secret, 3, 60), flower.create_shares(secret, 3, 60)
    assert flower.combine_shares(_subset(rng, ours, 3)) == secret
    assert combine_shares(_subset(rng, theirs, 40)) == secret


def test_empty_secret_is_one_padded_chunk():
    shares = create_shares(b"", 2, 3)
    assert all(len(s) == 20 for s in shares)
    assert combine_shares(shares[1:]) == b"" == flower.combine_shares(shares[:2])


def test_fewer_than_threshold_shares_do_not_give_the_secret():
    rng = random.Random(7)
    for trial in range(60):
        secret = rng.randbytes(rng.choice([16, 32, 33, 306]))
        n = rng.randint(3, 40)
        t = rng.randint(2, n)
        shares = create_shares(secret, t, n)
        for size in range(1, t):
            few = _subset(rng, shares, size)
            try:
                got = combine_shares(few)
            except ValueError as exc:
                assert str(exc) == "Failed to combine shares", trial
            else:
                assert got != secret, trial


def test_shares_are_fresh_random():
    secret = bytes(32)
    a, b = create_shares(secret, 3, 5), create_shares(secret, 3, 5)
    assert all(x[:4] == y[:4] and x[4:] != y[4:] for x, y in zip(a, b, strict=True))
    # Below the threshold a share says nothing: one share of a 2-of-n sharing is uniform
    # whatever the secret (here all zeros), so no byte of it repeats much across sharings.
    first = np.array([list(create_shares(bytes(16), 2, 2)[0][4:]) for _ in range(200)])
    assert all(len(set(col)) > 50 for col in first.T)


def test_duplicate_shares_raise_like_flower():
    shares = create_shares(b"secret seed", 3, 5)
    for bad in ([shares[0], shares[1], shares[0]], [shares[2], shares[2], shares[3], shares[4]]):
        with pytest.raises(ValueError, match="^Duplicate share$"):
            combine_shares(bad)
        with pytest.raises(ValueError, match="^Duplicate share$"):
            flower.combine_shares(bad)
    # Same index, different content (e.g. a forged share) is a duplicate too.
    forged = shares[1][:4] + bytes(len(shares[1]) - 4)
    with pytest.raises(ValueError, match="^Duplicate share$"):
        combine_shares([shares[1], forged, shares[2]])


def test_a_corrupted_share_breaks_combine():
    rng = random.Random(11)
    secret = rng.randbytes(40)  # chunks: 16 + 16 + 8 with 8 bytes of padding
    shares = create_shares(secret, 4, 7)
    for size in (4, 7):  # exactly threshold, and more: every Lagrange coefficient is non-zero
        picked = _subset(rng, shares, size)
        assert combine_shares(picked) == secret
        victim = rng.randrange(size)
        # A flipped bit in a data chunk: the padding survives, the secret does not.
        bad = bytearray(picked[victim])
        bad[4 + 16 + 3] ^= 0x01
        broken = [*picked[:victim], bytes(bad), *picked[victim + 1 :]]
        got = combine_shares(broken)
        assert got != secret and len(got) == len(secret)
        assert got[:16] == secret[:16] and got[32:] == secret[32:]  # only that chunk differs
        assert got == flower.combine_shares(broken)
        # A flipped bit in the last chunk: almost always bad padding, never the secret.
        bad = bytearray(picked[victim])
        bad[-1] ^= 0x80
        broken = [*picked[:victim], bytes(bad), *picked[victim + 1 :]]
        assert _outcome(combine_shares, broken) != secret
        assert _outcome(combine_shares, broken) == _outcome(flower.combine_shares, broken)


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="2 <= threshold <= num"):
        create_shares(b"x", 1, 3)  # a 1-of-n share would be the secret itself
    with pytest.raises(ValueError, match="threshold=4, num=3"):
        create_shares(b"x", 4, 3)
    with pytest.raises(ValueError, match=f"<= {MAX_SHARES}"):
        create_shares(b"x", 2, MAX_SHARES + 1)
    with pytest.raises(TypeError, match="threshold must be an int"):
        create_shares(b"x", 2.0, 3)
    with pytest.raises(TypeError, match="secret must be bytes"):
        create_shares("text", 2, 3)
    shares = create_shares(b"x" * 20, 2, 4)
    with pytest.raises(ValueError, match="no shares"):
        combine_shares([])
    with pytest.raises(ValueError, match=r"different lengths \[36, 52\]"):
        combine_shares([shares[0], shares[1] + bytes(16)])
    with pytest.raises(ValueError, match="different lengths"):
        combine_shares([shares[0], shares[1][:-16]])
    with pytest.raises(ValueError, match="a share of 35 bytes"):
        combine_shares([s[:-1] for s in shares])
    with pytest.raises(ValueError, match="a share of 4 bytes"):
        combine_shares([s[:4] for s in shares])
    with pytest.raises(ValueError, match="index 0"):
        combine_shares([bytes(4) + shares[0][4:], shares[1]])
    with pytest.raises(TypeError, match="not one byte string"):
        combine_shares(shares[0])
    with pytest.raises(TypeError, match="a share must be bytes"):
        combine_shares([shares[0], "x"])


# --- installed where SecAgg+ calls it -------------------------------------------------------


def _flower_call_sites() -> set[tuple[str, str]]:
    """(module, name) for every flwr module that imports a Shamir function by name (or calls
    it as `shamir.<name>`, which patching a module global could not reach)."""
    import flwr

    root = pathlib.Path(flwr.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in ("create_shares", "combine_shares"):
            imported = re.search(rf"^from \S+ import .*\b{name}\b", text, re.M)
            if imported or re.search(rf"\bshamir\.{name}\b", text):
                module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
                found.add((module, name))
    return found


def test_install_replaces_every_call_site():
    secure_masks.install()
    assert secure_masks.installed()
    targets = {(m, name) for m, name, _ in secure_masks.SHAMIR_TARGETS}
    assert _flower_call_sites() == targets  # no SecAgg+ module left calling pycryptodome
    for module, name, fn in secure_masks.SHAMIR_TARGETS:
        assert getattr(importlib.import_module(module), name) is fn
    # What the protocol functions resolve at call time (their globals) is ours.
    from flwr.client.mod import secaggplus_mod
    from flwr.server.workflow import SecAggPlusWorkflow

    assert secaggplus_mod.__globals__["create_shares"] is create_shares
    assert SecAggPlusWorkflow.unmask_stage.__globals__["combine_shares"] is combine_shares
    # Flower's own functions are remembered, and are the pycryptodome ones.
    assert secure_masks.UPSTREAM["create_shares"] is flower.create_shares
    assert secure_masks.UPSTREAM["combine_shares"] is flower.combine_shares
    # installed() notices a Shamir call site that is not ours; install() puts it back.
    workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
    )
    workflow.combine_shares = flower.combine_shares
    try:
        assert not secure_masks.installed()
    finally:
        secure_masks.install()
    assert secure_masks.installed()
    assert workflow.combine_shares is combine_shares


def test_install_refuses_other_flower_versions(monkeypatch):
    import flwr

    from common.errors import FedmergeError

    monkeypatch.setattr(flwr, "__version__", "1.40.0")
    with pytest.raises(FedmergeError, match=r"SecAgg\+ patches \(masks, Shamir, X25519\)"):
        secure_masks.install()


# --- an exact SecAgg+ round ---------------------------------------------------------------


def _exact_round(sites_hists, candidates: int):
    from flwr.app import Context, RecordDict

    from server.grid import CoordinatorGrid
    from server.recipe import SecAggSettings
    from server.secagg import secure_round

    apps = {100 + i: fixed_site_app(h) for i, h in enumerate(sites_hists)}
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    out = secure_round(
        CoordinatorGrid(LoopbackGrid(apps)), ctx, node_ids=list(apps),
        instructions=fixed_instructions(candidates), settings=SecAggSettings(timeout=5.0),
    )
    assert sorted(out.contributors) == list(apps) and not out.failures
    for c in range(candidates):
        for k in range(2):
            np.testing.assert_array_equal(
                out.histograms[c][k], sum(s[c][k] for s in sites_hists)
            )


def test_round_uses_our_shamir(monkeypatch):
    calls = {"create": 0, "combine": 0}
    pad, unpad = secure_shamir._pad, secure_shamir._unpad

    def counted_pad(data):
        calls["create"] += 1
        return pad(data)

    def counted_unpad(data):
        calls["combine"] += 1
        return unpad(data)

    monkeypatch.setattr(secure_shamir, "_pad", counted_pad)
    monkeypatch.setattr(secure_shamir, "_unpad", counted_unpad)
    rng = np.random.default_rng(5)
    _exact_round([random_hists(rng, 2, 100) for _ in range(4)], 2)
    # Each site shares its mask seed and its private key; the coordinator rebuilds every
    # active site's seed.
    assert calls == {"create": 8, "combine": 4}


@pytest.mark.parametrize("flower_side", ["sites", "coordinator"])
def test_mixed_round_with_flower_shamir_on_one_side(monkeypatch, flower_side):
    """Sites on Flower's Shamir and a coordinator on ours, or the reverse: still exact."""
    swapped = tuple(
        (m, name, flower.create_shares if name == "create_shares" else flower.combine_shares)
        if (name == "create_shares") == (flower_side == "sites") else (m, name, fn)
        for m, name, fn in secure_masks.SHAMIR_TARGETS
    )
    monkeypatch.setattr(secure_masks, "SHAMIR_TARGETS", swapped)
    try:
        rng = np.random.default_rng(6)
        _exact_round([random_hists(rng, 1, 50) for _ in range(3)], 1)
    finally:
        monkeypatch.undo()
        secure_masks.install()
    assert secure_masks.installed()

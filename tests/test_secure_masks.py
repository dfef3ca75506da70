"""The cryptographic mask generator is what Flower's SecAgg+ code actually calls."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from secagg_support import task_identity  # noqa: F401 (autouse fixture: Messages need a run id)

from common import secure_masks
from common.errors import FedmergeError
from common.secure_masks import PATCHED_MODULES, crypto_rand_gen, install, installed


def test_install_replaces_every_call_site():
    install()
    assert installed()
    for name in PATCHED_MODULES:
        assert importlib.import_module(name).pseudo_rand_gen is crypto_rand_gen, name
    # What the protocol functions resolve at call time (their globals) is ours.
    from flwr.client.mod import secaggplus_mod
    from flwr.server.workflow import SecAggPlusWorkflow

    assert secaggplus_mod.__globals__["pseudo_rand_gen"] is crypto_rand_gen
    assert SecAggPlusWorkflow.unmask_stage.__globals__["pseudo_rand_gen"] is crypto_rand_gen
    # The SecAgg+ guard of fedmerge's ClientApp installs it too (it may run in a fresh
    # process): undo the patch, send the app one SecAgg+ message, and it is back.
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType

    from client.client_app import app

    for name in PATCHED_MODULES:
        importlib.import_module(name).pseudo_rand_gen = secure_masks.UPSTREAM["pseudo_rand_gen"]
    assert not installed()
    ctx = Context(
        run_id=1, node_id=7, state=RecordDict(), run_config={},
        node_config={"data": "synthetic:", "parent-a": "/a", "parent-b": "/b"},
    )
    msg = Message(
        RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})}),
        dst_node_id=7, message_type=MessageType.TRAIN, group_id="1",
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = app(msg, ctx)
    assert reply.has_error()  # a setup without its numbers is refused ...
    assert installed()  # ... after the masks were installed


def test_masks_differ_from_upstream_and_use_the_whole_seed():
    install()
    upstream = secure_masks.UPSTREAM["pseudo_rand_gen"]
    dims = [(1,), (4, 8), ()]
    seed = bytes(range(32))
    ours = crypto_rand_gen(seed, 2**32, dims)
    theirs = upstream(seed, 2**32, dims)
    assert [a.shape for a in ours] == [a.shape for a in theirs]
    assert all(a.dtype == np.int64 for a in ours)
    assert not np.array_equal(ours[1], theirs[1])
    # Deterministic per seed (both protocol ends must agree).
    again = crypto_rand_gen(seed, 2**32, dims)
    assert all(np.array_equal(a, b) for a, b in zip(ours, again, strict=True))
    # Swapping two 4-byte words keeps upstream's 32-bit XOR fold, hence its masks;
    # the full-seed hash gives different masks.
    swapped = seed[4:8] + seed[0:4] + seed[8:]
    assert np.array_equal(upstream(swapped, 2**32, dims)[1], theirs[1])
    assert not np.array_equal(crypto_rand_gen(swapped, 2**32, dims)[1], ours[1])


def test_masks_are_bound_to_the_round_they_are_drawn_for():
    """Inside `bound_to(d)` a seed gives masks of its own for each round digest d: the same d
    the same masks at both ends, another d (a site told other terms) other masks; outside any
    binding, the masks of the unbound generator (SHA-256 of the seed)."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed, dims = b"s" * 32, [(64,)]
    first, second = hashlib.sha256(b"round 1").digest(), hashlib.sha256(b"round 1'").digest()
    (unbound,) = crypto_rand_gen(seed, 2**32, dims)
    with secure_masks.bound_to(first):
        (one,) = crypto_rand_gen(seed, 2**32, dims)
        with secure_masks.bound_to(second):  # nested: the inner binding, then the outer again
            (other,) = crypto_rand_gen(seed, 2**32, dims)
        (one_again,) = crypto_rand_gen(seed, 2**32, dims)
    (unbound_again,) = crypto_rand_gen(seed, 2**32, dims)
    assert np.array_equal(one, one_again) and np.array_equal(unbound, unbound_again)
    assert not np.array_equal(one, other) and not np.array_equal(one, unbound)
    key = hashlib.sha256(seed).digest()  # the unbound key, written out
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(256))
    assert np.array_equal(unbound, np.frombuffer(stream, "<u4").astype(np.int64))
    with pytest.raises(ValueError, match="32-byte"), secure_masks.bound_to(b"short"):
        pass


def test_masks_are_uniform_over_the_modulus():
    (x,) = crypto_rand_gen(b"k" * 32, 2**16, [(200_000,)])
    assert x.min() >= 0 and x.max() < 2**16
    assert abs(x.mean() / 2**16 - 0.5) < 0.005
    counts = np.bincount(x >> 12, minlength=16)  # 16 equal buckets
    assert counts.min() > 0.9 * counts.mean()


def test_bad_ranges_refused():
    with pytest.raises(ValueError, match="power of two"):
        crypto_rand_gen(b"s" * 32, 1000, [(3,)])
    with pytest.raises(ValueError, match="power of two"):
        crypto_rand_gen(b"s" * 32, 2**33, [(3,)])


def test_refuses_other_flower_versions(monkeypatch):
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    with pytest.raises(FedmergeError, match=r"flwr 1\.42\.0 is installed.*1\.41\.0"):
        install()

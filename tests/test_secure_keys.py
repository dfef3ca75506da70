"""X25519 key agreement as SecAgg+ uses it: both ends derive one key, forged keys are refused,
and it is what the client mod and the server workflow call once installed."""

from __future__ import annotations

import base64
import importlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common import secure_keys as sk
from common.secure_masks import install

CLIENT_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
SERVER_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"


def test_both_ends_agree_and_keys_round_trip_as_raw_32_bytes():
    a_sk, a_pk = sk.generate_key_pairs()
    b_sk, b_pk = sk.generate_key_pairs()
    a_raw, b_pub = sk.private_key_to_bytes(a_sk), sk.public_key_to_bytes(b_pk)
    assert len(a_raw) == 32 and len(b_pub) == 32
    k1 = sk.generate_shared_key(sk.bytes_to_private_key(a_raw), sk.bytes_to_public_key(b_pub))
    k2 = sk.generate_shared_key(b_sk, a_pk)
    assert k1 == k2
    # The derivation is HKDF-SHA256 over the X25519 secret with fedmerge's label (RFC 7748 +
    # RFC 5869), in Fernet's urlsafe-base64 key format.
    secret = a_sk.exchange(b_pk)
    want = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"fedmerge secagg+ x25519 v1").derive(secret)
    assert base64.urlsafe_b64decode(k1) == want
    c_sk, _ = sk.generate_key_pairs()
    assert sk.generate_shared_key(c_sk, b_pk) != k1


def test_forged_keys_are_refused():
    a_sk, _ = sk.generate_key_pairs()
    with pytest.raises(ValueError, match="expected 32"):
        sk.bytes_to_public_key(b"\x04" + bytes(96))  # a P-384 point is not an X25519 key
    with pytest.raises(ValueError, match="expected 32"):
        sk.bytes_to_private_key(bytes(31))
    # A low-order point would give an all-zero secret, i.e. a mask the coordinator knows.
    with pytest.raises(ValueError):
        sk.generate_shared_key(a_sk, sk.bytes_to_public_key(bytes(32)))


def test_installed_where_secagg_calls_key_agreement():
    install()
    client = importlib.import_module(CLIENT_MOD)
    server = importlib.import_module(SERVER_WORKFLOW)
    for name in ("generate_key_pairs", "private_key_to_bytes", "public_key_to_bytes",
                 "bytes_to_private_key", "bytes_to_public_key", "generate_shared_key"):
        assert getattr(client, name) is getattr(sk, name), name
    for name in ("bytes_to_private_key", "bytes_to_public_key", "generate_shared_key"):
        assert getattr(server, name) is getattr(sk, name), name

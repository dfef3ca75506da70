"""X25519 key agreement for SecAgg+ in place of Flower's P-384 with PEM-encoded keys.

Why: in a round of n sites every site agrees a key with each of its n-1 neighbours twice
(once to encrypt the shares it sends, once per pairwise mask), so 50 sites make ~4,900
agreements. Flower 1.41 does each one on P-384 and re-parses the PEM private key every time:
at 50 sites that was ~4.4 s of a ~7.8 s round on two cores (`bench/secagg_scale.py`).
X25519 (RFC 7748, ~128-bit security, the curve of TLS 1.3 and Signal) agrees a key in tens of
microseconds, and its raw 32-byte private key is also a 10x smaller secret for Shamir to
split than a ~300-byte PEM.

The derived key keeps Flower's format (a urlsafe-base64 32-byte key, which is what Fernet and
the mask expander take), so the protocol messages are unchanged; only the key bytes the
sites exchange are shorter. Every party of a round must use the same agreement, so
`common.secure_masks.install` swaps these in at the client mod and the server workflow
together with the masks. The HKDF `info` names fedmerge's protocol so keys derived here can
never collide with keys another protocol derives from the same X25519 pair.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
_HKDF_INFO = b"fedmerge secagg+ x25519 v1"


def generate_key_pairs() -> tuple[X25519PrivateKey, X25519PublicKey]:
    private = X25519PrivateKey.generate()
    return private, private.public_key()


def private_key_to_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes_raw()


def public_key_to_bytes(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes_raw()


def bytes_to_private_key(data: bytes) -> X25519PrivateKey:
    """Flower's client mod re-reads the site's own key for every neighbour (49 times a stage
    at 50 sites), and parsing was a third of the agreement's cost: the last few keys are kept
    parsed. They are the keys the node's SecAgg+ state already holds, for at most 4 keys."""
    if len(data) != KEY_BYTES:
        raise ValueError(f"secure keys: private key of {len(data)} bytes, expected {KEY_BYTES}")
    return _parsed_private_key(bytes(data))


@lru_cache(maxsize=4)
def _parsed_private_key(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


def bytes_to_public_key(data: bytes) -> X25519PublicKey:
    if len(data) != KEY_BYTES:
        raise ValueError(f"secure keys: public key of {len(data)} bytes, expected {KEY_BYTES}")
    return X25519PublicKey.from_public_bytes(bytes(data))


def generate_shared_key(private_key: X25519PrivateKey, public_key: X25519PublicKey) -> bytes:
    """Urlsafe-base64 32-byte key shared by the two ends (Fernet's key format, as Flower's).

    `exchange` raises on a low-order public key (an all-zero shared secret), so a forged key
    cannot force a known mask.
    """
    secret = private_key.exchange(public_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(
        secret
    )
    return base64.urlsafe_b64encode(derived)

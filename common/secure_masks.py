"""fedmerge's SecAgg+ primitives in place of Flower's: ChaCha20 masks, a fast Shamir, X25519.

SecAgg+ hides each hospital's vector behind masks expanded from secret seeds. Flower 1.41's
expander folds the seed to 32 bits and draws from numpy's Mersenne Twister (flower#7522): a
server that sees masked vectors could search 2**32 seeds, and MT output is predictable. Here
the whole seed is hashed (SHA-256) into a ChaCha20 key and the keystream gives the mask
words, so recovering a mask means breaking ChaCha20 or guessing a 256-bit secret.

The seeds and keys themselves are Shamir-shared among the sites. Flower's `create_shares` /
`combine_shares` (pycryptodome's pure-Python GF(2^128)) were 87% of a 50-site round (~80 s);
`common.secure_shamir` computes the same shares in the same byte format 30-300x faster
(the round: ~7.7 s, `bench/secagg_scale.py`). Its shares and Flower's are interchangeable, so
this swap changes cost, not the protocol. Key agreement is X25519 (`common.secure_keys`):
~4,900 P-384 agreements with PEM parsing were most of what remained at 50 sites.

Both ends of the protocol must expand seeds identically or the masks do not cancel, so the
replacements are installed where the server workflow and the client mod look the names up
(`pseudo_rand_gen` in both; `create_shares` in the client mod, `combine_shares` in the
workflow). The patch targets module globals of one Flower release; on any other release it
refuses to run instead of silently falling back to the weak generator.

Masks are also bound to the round (`bound_to`): every seed is hashed together with the
digest of the round's instructions as each end saw them. Why: sites never see one another's
messages, so a coordinator could tell each site different terms (one site ε = 1, the others
ε = 8, so the sum carries less noise than that site was charged for) and still get a sum.
Bound, two sites told different terms draw different pairwise masks, which then do not
cancel: the sum is uniformly random and tells nothing of anyone. Honest rounds send every
site the same instructions, so nothing changes for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from common.errors import FedmergeError
from common.flower_runtime import PINNED_FLWR_VERSION
from common.secure_keys import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    public_key_to_bytes,
)
from common.secure_shamir import combine_shares, create_shares

# Modules whose global `pseudo_rand_gen` the SecAgg+ code calls at run time.
PATCHED_MODULES = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
)

# Module global -> fedmerge's function, per module where Flower's SecAgg+ calls the name.
SHAMIR_TARGETS = (
    ("flwr.client.mod.secure_aggregation.secaggplus_mod", "create_shares", create_shares),
    ("flwr.server.workflow.secure_aggregation.secaggplus_workflow", "combine_shares",
     combine_shares),
)

_CLIENT_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
_SERVER_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
# Key agreement: X25519 (common.secure_keys) at every site and in the server's unmasking.
KEY_TARGETS = tuple(
    (_CLIENT_MOD, fn.__name__, fn)
    for fn in (
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
        bytes_to_private_key,
        bytes_to_public_key,
        generate_shared_key,
    )
) + tuple(
    (_SERVER_WORKFLOW, fn.__name__, fn)
    for fn in (bytes_to_private_key, bytes_to_public_key, generate_shared_key)
)

_NONCE = bytes(16)  # one key per seed and one use per key: a fixed nonce is safe
# The digest of the round whose masks are being drawn (empty: unbound, e.g. a unit test).
# A ContextVar, not a global: in one process (the loopback tests) a site's masking runs
# nested inside the coordinator's round, each under its own view of the round.
_ROUND_BINDING: ContextVar[bytes] = ContextVar("fedmerge_round_binding", default=b"")
_BINDING_LABEL = b"fedmerge secagg+ round binding v1\x00"


@contextmanager
def bound_to(round_digest: bytes) -> Iterator[None]:
    """Draw every mask inside this block bound to `round_digest` (32 bytes, the SHA-256 of
    the round's instructions: `common.protocol.instructions_digest`)."""
    if len(round_digest) != 32:
        raise ValueError("secure masks: a round binding is a 32-byte digest")
    token = _ROUND_BINDING.set(bytes(round_digest))
    try:
        yield
    finally:
        _ROUND_BINDING.reset(token)


# Flower's own functions by name, kept so tests can show ours differ from (or agree with) them.
UPSTREAM: dict[str, object] = {}


def crypto_rand_gen(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks uniform on [0, num_range), one int64 array per shape, from a ChaCha20 keystream.

    Same signature and output types as Flower's generator, so the protocol code is unchanged.
    `num_range` must be a power of two up to 2**32 (SecAgg+'s modulus): masking the low bits
    of uniform 32-bit words is then exactly uniform.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if not isinstance(seed, bytes | bytearray) or len(seed) == 0:
        raise ValueError("secure masks: seed must be non-empty bytes")
    if num_range < 2 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"secure masks: num_range={num_range}, expected a power of two <= 2**32")
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in dimensions_list]
    total = sum(sizes)
    binding = _ROUND_BINDING.get()
    key = hashlib.sha256((_BINDING_LABEL + binding if binding else b"") + bytes(seed)).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * total)) + encryptor.finalize()
    words = np.frombuffer(stream, dtype="<u4").astype(np.int64) & (num_range - 1)
    out: list[np.ndarray] = []
    start = 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        chunk = words[start : start + size]
        start += size
        out.append(np.array(chunk[0], dtype=np.int64) if len(shape) == 0 else chunk.reshape(shape))
    return out


def check_flwr_version() -> None:
    """Refuse to run SecAgg+ on a Flower release the patch was not checked against."""
    from common.flower_runtime import check_flwr_version as check

    check("fedmerge's SecAgg+ patches (masks, Shamir, X25519)")


def _replacements():
    """(module name, global name, fedmerge's function) for every SecAgg+ call site."""
    return (
        [(m, "pseudo_rand_gen", crypto_rand_gen) for m in PATCHED_MODULES]
        + list(SHAMIR_TARGETS)
        + list(KEY_TARGETS)
    )


def install() -> None:
    """Make Flower's SecAgg+ server workflow and client mod draw masks from `crypto_rand_gen`,
    share secrets with `common.secure_shamir` and agree keys with `common.secure_keys`.

    Idempotent and cheap, so every process that may run SecAgg+ (server thread, Ray actor,
    ClientApp subprocess) calls it before the protocol starts.
    """
    import importlib

    check_flwr_version()
    targets = [(importlib.import_module(m), m, g, fn) for m, g, fn in _replacements()]
    for module, name, attr, _ in targets:  # all checked before any is patched
        if not hasattr(module, attr):
            raise FedmergeError(
                f"{name}: no {attr!r} to replace (expected flwr=={PINNED_FLWR_VERSION})"
            )
    for module, _, attr, fn in targets:
        current = getattr(module, attr)
        if current is not fn:
            UPSTREAM.setdefault(attr, current)
        setattr(module, attr, fn)


def installed() -> bool:
    """True when every SecAgg+ call site resolves the mask generator and Shamir to ours."""
    import importlib

    return all(
        getattr(importlib.import_module(m), attr, None) is fn for m, attr, fn in _replacements()
    )

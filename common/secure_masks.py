"""Cryptographic SecAgg+ masks in place of Flower's `pseudo_rand_gen`.

SecAgg+ hides each hospital's vector behind masks expanded from secret seeds. Flower 1.41's
expander folds the seed to 32 bits and draws from numpy's Mersenne Twister (flower#7522): a
server that sees masked vectors could search 2**32 seeds, and MT output is predictable. Here
the whole seed is hashed (SHA-256) into a ChaCha20 key and the keystream gives the mask
words, so recovering a mask means breaking ChaCha20 or guessing a 256-bit secret.

Both ends of the protocol must expand seeds identically or the masks do not cancel, so the
replacement is installed where the server workflow and the client mod look the name up. The
patch targets module globals of one Flower release; on any other release it refuses to run
instead of silently falling back to the weak generator.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from common.errors import FedmergeError
from common.flower_runtime import PINNED_FLWR_VERSION

# Modules whose global `pseudo_rand_gen` the SecAgg+ code calls at run time.
PATCHED_MODULES = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
)

_NONCE = bytes(16)  # one key per seed and one use per key: a fixed nonce is safe
# Flower's own generator, kept so tests can show ours differs from it.
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
    key = hashlib.sha256(bytes(seed)).digest()
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

    check("fedmerge's secure-mask patch")


def install() -> None:
    """Make Flower's SecAgg+ server workflow and client mod draw masks from `crypto_rand_gen`.

    Idempotent and cheap, so every process that may run SecAgg+ (server thread, Ray actor,
    ClientApp subprocess) calls it before the protocol starts.
    """
    import importlib

    check_flwr_version()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        if not hasattr(module, "pseudo_rand_gen"):
            raise FedmergeError(
                f"{name}: no 'pseudo_rand_gen' to replace (expected flwr=={PINNED_FLWR_VERSION})"
            )
        if module.pseudo_rand_gen is not crypto_rand_gen:
            UPSTREAM.setdefault("pseudo_rand_gen", module.pseudo_rand_gen)
        module.pseudo_rand_gen = crypto_rand_gen


def installed() -> bool:
    """True when every SecAgg+ call site resolves the generator to ours."""
    import importlib

    return all(
        getattr(importlib.import_module(name), "pseudo_rand_gen", None) is crypto_rand_gen
        for name in PATCHED_MODULES
    )

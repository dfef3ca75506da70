"""The noise a site adds to its counts: OpenDP's exact discrete Gaussian sampler.

Why OpenDP and integers: floating-point Gaussian samplers leak through their low-order bits
(Mironov 2012) and would not survive SecAgg+'s integer field; the discrete Gaussian keeps every
noisy count an integer, so the masked sum stays exact and the pooled noise is exactly the sum
of the sites' noise.
"""

from __future__ import annotations

import numpy as np

from common.dp.accounting import _opendp, integer_space
from common.errors import FedmergeError

# OpenDP's integer atom is i32; counts and noise stay far inside it.
_I32 = 2**31 - 1


def noisy_counts(counts: np.ndarray, sigma: float) -> np.ndarray:
    """`counts` + independent discrete Gaussian noise of scale `sigma` per entry (int64)."""
    arr = np.asarray(counts)
    if not np.issubdtype(arr.dtype, np.integer):
        raise FedmergeError(f"privacy: counts of dtype {arr.dtype}; expected integers")
    if arr.size and int(np.abs(arr).max()) > _I32 // 2:
        raise FedmergeError("privacy: a count exceeds 2**30; expected histogram counts")
    if not sigma > 0:
        raise FedmergeError(f"privacy: noise scale {sigma}; expected > 0")
    dp = _opendp()
    meas = dp.m.make_gaussian(*integer_space(), scale=float(sigma))
    out = np.asarray(meas([int(v) for v in arr.reshape(-1)]), dtype=np.int64)
    return out.reshape(arr.shape)

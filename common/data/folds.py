"""Deterministic k-fold assignment by stay id.

The federated search tunes λ on one fold and reports on another (PatientDx used k = 2). Every
site and every command must agree on the split without exchanging anything, so the fold is a
pure function of the stay id and a shared seed: a SHA-256 of f"{seed}:{stay_id}". It does not
depend on record order, on which other records a site holds, or on the Python hash seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from common.data import lazy
from common.errors import FedmergeError
from common.records import PatientRecord


def _check(folds: int, fold: int | None = None) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise FedmergeError(f"folds = {folds!r}: expected an integer of at least 1")
    if fold is not None and (
        isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds
    ):
        raise FedmergeError(f"fold = {fold!r}: expected an integer from 0 to {folds - 1}")


def fold_of(stay_id: str, folds: int, seed: int = 0) -> int:
    """The fold (0 … folds-1) of one stay: first 8 bytes of the digest, big-endian, mod folds."""
    _check(folds)
    digest = hashlib.sha256(f"{seed}:{stay_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def select_fold(
    records: Sequence[PatientRecord], fold: int, folds: int, seed: int = 0
) -> Sequence[PatientRecord]:
    """The records of fold `fold` (0-based) of `folds`, in their original order.

    Reads only the stay ids, so lazy records (`common.data.lazy`) give a view that builds
    nothing until the fold's records are read.
    """
    _check(folds, fold)
    ids = lazy.stay_ids(records)
    chosen = [i for i, stay in enumerate(ids) if fold_of(stay, folds, seed) == fold]
    return lazy.take(records, chosen)

"""Fold assignment: a pure, seeded function of the stay id, balanced and order-independent."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from common.data.folds import fold_of, select_fold
from common.errors import FedmergeError
from common.records import PatientRecord

IDS = [str(141000 + 7 * i) for i in range(10_000)]


def test_formula_and_determinism():
    # The contract other sites implement: first 8 bytes of SHA-256(f"{seed}:{id}"), mod k.
    digest = hashlib.sha256(b"3:141765").digest()
    assert fold_of("141765", 5, seed=3) == int.from_bytes(digest[:8], "big") % 5
    assert [fold_of(i, 2) for i in IDS] == [fold_of(i, 2) for i in IDS]


@pytest.mark.parametrize("folds", [2, 5])
def test_balanced(folds):
    counts = Counter(fold_of(i, folds) for i in IDS)
    assert sorted(counts) == list(range(folds))
    share = len(IDS) / folds
    assert all(abs(c - share) < 0.05 * share for c in counts.values()), counts


def test_seed_changes_the_split():
    same = sum(fold_of(i, 2, seed=0) == fold_of(i, 2, seed=1) for i in IDS)
    assert 0.45 * len(IDS) < same < 0.55 * len(IDS)


def test_select_fold_partitions_in_order():
    records = [PatientRecord(stay_id=i, label=int(i) % 2, text="t") for i in IDS[:500]]
    parts = [select_fold(records, f, 3, seed=7) for f in range(3)]
    assert sorted(r.stay_id for p in parts for r in p) == sorted(IDS[:500])
    for part in parts:
        assert [r.stay_id for r in part] == sorted((r.stay_id for r in part), key=IDS.index)
    # Order-independent: a site holding the records reversed gets the same members.
    assert {r.stay_id for r in select_fold(records[::-1], 1, 3, seed=7)} == {
        r.stay_id for r in parts[1]
    }


@pytest.mark.parametrize(("fold", "folds"), [(2, 2), (-1, 2), (0, 0), (0, True)])
def test_bad_fold_arguments(fold, folds):
    with pytest.raises(FedmergeError):
        select_fold([], fold, folds)

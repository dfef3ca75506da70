"""Simulated site splits: seeded, complete, disjoint, and skewed the way they claim."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.splits import split_records
from common.errors import FedmergeError
from common.records import PatientRecord


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    return [
        PatientRecord(
            stay_id=f"s{i:04d}", site_id=f"r{i % 3}", label=int(rng.random() < 0.2), text="x"
        )
        for i in range(600)
    ]


@pytest.mark.parametrize("split", ["iid", "label", "size"])
def test_partition_is_complete_disjoint_and_seeded(records, split):
    names, parts = split_records(records, split, 4, seed=5)
    assert names == ["site-0", "site-1", "site-2", "site-3"]
    ids = [r.stay_id for p in parts for r in p]
    assert sorted(ids) == sorted(r.stay_id for r in records) and len(set(ids)) == len(ids)
    again = split_records(list(reversed(records)), split, 4, seed=5)[1]
    assert [[r.stay_id for r in p] for p in parts] == [[r.stay_id for r in p] for p in again]
    other = split_records(records, split, 4, seed=6)[1]
    assert [[r.stay_id for r in p] for p in parts] != [[r.stay_id for r in p] for p in other]


def test_skews(records):
    _, iid = split_records(records, "iid", 4, 0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    _, size = split_records(records, "size", 4, 0)
    assert len(size[-1]) / len(size[0]) == pytest.approx(4.0, rel=0.05)
    _, label = split_records(records, "label", 4, 0)
    rates = [np.mean([r.label for r in p]) for p in label]
    iid_rates = [np.mean([r.label for r in p]) for p in iid]
    assert np.std(rates) > 2 * np.std(iid_rates)
    assert all(any(r.label for r in p) and not all(r.label for r in p) for p in label)


def test_region_uses_the_data_sites(records):
    names, parts = split_records(records, "region", None)
    assert names == ["r0", "r1", "r2"] and all(len(p) == 200 for p in parts)
    with pytest.raises(FedmergeError, match="--sites 5 but the data has 3 sites"):
        split_records(records, "region", 5)
    with pytest.raises(FedmergeError, match="expected one of"):
        split_records(records, "random", 3)


def test_site_files_reload_as_the_same_split(records, tmp_path):
    from common.data import load_records
    from common.data.splits import write_site_files

    names, parts = split_records(records, "label", 3, seed=1)
    union, files = write_site_files(tmp_path, names, parts)
    assert [f.name for f in files] == ["site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    for path, part in zip(files, parts, strict=True):
        back = load_records(f"jsonl:{path}")
        assert [(r.stay_id, r.label) for r in back] == [(r.stay_id, r.label) for r in part]
    assert len(load_records(f"jsonl:{union}")) == len(records)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind

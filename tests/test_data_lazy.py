"""LazyRecords: the table-backed loaders' records, built when read (issue 14)."""

from __future__ import annotations

import pickle

import pytest
from mimic4_fixture import write_mimic4

from common.data import load_records
from common.data.folds import select_fold
from common.data.lazy import LazyRecords
from common.data.mimic_text import build_records
from common.data.select import select_site
from common.data.splits import split_records
from common.records import PatientRecord


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = write_mimic4(tmp_path_factory.mktemp("mimic4"))
    return f"mimic4:{root}?site=north&cache={root / 'cache'}"


@pytest.fixture(params=["fresh", "cached"])
def lazy(request, spec) -> LazyRecords:
    if request.param == "fresh":  # read from the export by the engine, every time
        return load_records(spec.split("&cache=")[0] + "&cache=off")
    load_records(spec)  # writes the cache if no test has yet
    return load_records(spec)


def _eager(records: LazyRecords) -> list[PatientRecord]:
    return build_records(records._table, site="north")


def test_loading_builds_no_record_and_equals_the_eager_records(lazy):
    assert isinstance(lazy, LazyRecords)
    assert not lazy._built  # len, the duplicate check and the columns built nothing
    assert lazy.stay_ids() == ["30001", "30002", "30004"]
    assert lazy.site_ids() == ["north"] * 3
    assert not lazy._built
    eager = _eager(lazy)
    assert lazy == eager and eager == lazy and list(lazy) == eager
    assert lazy.labels() == [r.label for r in eager]
    assert lazy != eager[:2] and lazy != "not records"


def test_indexing_slicing_and_views_share_built_records(lazy):
    eager = _eager(lazy)
    assert lazy[-1] == eager[-1] and lazy[0] == eager[0]
    assert lazy[0] is lazy[0]  # built once, then kept
    with pytest.raises(IndexError):
        lazy[3]
    tail = lazy[1:]
    assert isinstance(tail, LazyRecords) and tail == eager[1:]
    assert lazy[::-1] == eager[::-1] and lazy[5:] == []
    assert tail[0] is lazy[1]
    assert lazy.take([2, 0]) == [eager[2], eager[0]]
    assert eager[1] in lazy and lazy.index(eager[2]) == 2


def test_hard_view_is_lazy_and_equals_the_eager_hard_records(spec):
    hard = load_records(spec, hard=True)
    assert isinstance(hard, LazyRecords) and not hard._built
    assert hard == [r.hard() for r in load_records(spec)]


def test_pickled_view_round_trips_as_its_own_rows(lazy):
    view = lazy.take([2, 0])
    copy = pickle.loads(pickle.dumps(view))
    assert isinstance(copy, LazyRecords) and copy._table.num_rows == 2
    assert copy == view and copy.site_ids() == ["north", "north"]
    hard = pickle.loads(pickle.dumps(lazy.hard()))
    assert hard == [r.hard() for r in lazy]


def test_splits_folds_and_site_selection_read_columns_and_match_the_eager_list(lazy):
    eager = _eager(lazy)
    splits = (("iid", 2), ("label", 2), ("size", 1), ("region", None))
    results = {split: split_records(lazy, split, sites, seed=3) for split, sites in splits}
    folds = [select_fold(part, 0, 2, seed=5) for _, parts in results.values() for part in parts]
    chosen = select_site(lazy, "north", "spec", "site")
    assert not lazy._built  # nothing above built a record
    assert all(isinstance(part, LazyRecords) for part in [*folds, chosen])
    for split, sites in splits:
        assert results[split] == split_records(eager, split, sites, seed=3), split
    assert [*folds] == [select_fold(part, 0, 2, seed=5) for split, sites in splits
                        for part in split_records(eager, split, sites, seed=3)[1]]  # fmt: skip
    assert chosen == eager

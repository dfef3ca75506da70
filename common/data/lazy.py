"""A cohort's records kept as the Arrow table they came from, each built when first read.

Why: a cached 40,000-stay cohort memory-maps its Arrow file in milliseconds, but building its
~200,000 validated pydantic objects takes most of a second, and a node scores only one fold
of one site. `LazyRecords` is a read-only `Sequence[PatientRecord]` over the table: `len`,
`stay_ids()`, `labels()` and `site_ids()` read columns; splitting by site
(`common.data.splits`), choosing a fold (`common.data.folds`) or a site (`common.data.select`)
make views (`take`) without building anything; indexing, iteration and equality build the
records they touch, in blocks, and keep them, so a record read twice is the same object.
A view pickles as its own rows of the table, not as pydantic objects.

The records equal those of the eager loaders exactly: the builder is the loader's own
table-to-records function, applied to a block of rows.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, overload

import numpy as np

from common.records import PatientRecord

if TYPE_CHECKING:  # a LazyRecords always holds a table, so pyarrow is loaded by its maker;
    # the synthetic cohort, which never makes one, does not pay pyarrow's import (~0.1 s)
    import pyarrow as pa

Builder = Callable[["pa.Table"], list[PatientRecord]]
BLOCK = 1024  # rows converted together: Arrow→Python conversion is cheap per row in bulk


@contextmanager
def paused_gc() -> Iterator[None]:
    """Keep the cyclic garbage collector off while a cohort's records are built.

    A 40,000-stay cohort is about 200,000 small pydantic objects. Each allocation burst past
    CPython's generation-0 threshold starts a collection that walks the young objects, and
    the older generations get walked again and again as the list grows: measured, that made
    building the records two to three times slower than the work itself. The records hold no
    reference cycles, so nothing is left to collect; the collector resumes on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _indices(rows):
    import pyarrow as pa

    return pa.array(rows)


def hard_variant(record: PatientRecord) -> PatientRecord:
    """`load_records(hard=True)`'s view; a stay with nothing recorded stays as it is."""
    return record.hard() if record.sections or record.text else record


class LazyRecords(Sequence[PatientRecord]):
    """Records of `table`'s rows `rows` (all rows if None), built by `build` on access."""

    def __init__(self, table: pa.Table, build: Builder, *, site: str | None = None,
                 rows: np.ndarray | None = None, hard: bool = False,
                 _built: dict[int, PatientRecord] | None = None) -> None:  # fmt: skip
        self._table = table
        self._build = build
        self._site = site  # the site_id `build` gives every record if the table has no column
        self._rows = np.arange(table.num_rows) if rows is None else np.asarray(rows, np.int64)
        self._whole = rows is None  # every row in table order: columns need no `take`
        self._hard = hard
        self._built = {} if _built is None else _built  # shared by every view of one table

    # -- columns, without building records ------------------------------------------------

    def _column(self, name: str) -> list:
        column = self._table.column(name)
        if self._whole:
            return column.to_pylist()
        return column.take(_indices(self._rows)).to_pylist()

    def stay_ids(self) -> list[str]:
        return self._column("stay_id")

    def labels(self) -> list[int]:
        return self._column("label")

    def site_ids(self) -> list[str | None]:
        if "site_id" in self._table.column_names:
            return self._column("site_id")
        return [self._site] * len(self._rows)

    # -- views ----------------------------------------------------------------------------

    def take(self, positions: Sequence[int] | np.ndarray) -> LazyRecords:
        """The records at `positions` (of this sequence), as a view that builds nothing."""
        rows = self._rows[np.asarray(positions, dtype=np.int64)]
        return LazyRecords(self._table, self._build, site=self._site, rows=rows,
                           hard=self._hard, _built=self._built)  # fmt: skip

    def hard(self) -> LazyRecords:
        """The Mortality-hard view (numeric sections only), built lazily as well."""
        return LazyRecords(self._table, self._build, site=self._site,
                           rows=None if self._whole else self._rows, hard=True)  # fmt: skip

    # -- records ----------------------------------------------------------------------------

    def _records(self, rows: np.ndarray) -> list[PatientRecord]:
        """The records of table rows `rows`, building (in one block) those not built yet."""
        missing = sorted({int(r) for r in rows if int(r) not in self._built})
        if missing:
            first, count = missing[0], len(missing)
            contiguous = missing[-1] - first + 1 == count  # iterating in order: a zero-copy slice
            block = (self._table.slice(first, count) if contiguous
                     else self._table.take(_indices(missing)))  # fmt: skip
            with paused_gc():
                built = self._build(block)
            for row, record in zip(missing, built, strict=True):
                self._built[row] = hard_variant(record) if self._hard else record
        return [self._built[int(r)] for r in rows]

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> PatientRecord: ...

    @overload
    def __getitem__(self, index: slice) -> LazyRecords: ...

    def __getitem__(self, index: int | slice) -> PatientRecord | LazyRecords:
        if isinstance(index, slice):
            return self.take(np.arange(len(self._rows))[index])
        position = int(index)
        if position < 0:
            position += len(self._rows)
        if not 0 <= position < len(self._rows):
            raise IndexError(f"record index {index} out of range ({len(self._rows)} records)")
        return self._records(self._rows[position : position + 1])[0]

    def __iter__(self) -> Iterator[PatientRecord]:
        for start in range(0, len(self._rows), BLOCK):
            yield from self._records(self._rows[start : start + BLOCK])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-looking like a list: unhashable

    def __repr__(self) -> str:
        return f"LazyRecords({len(self)} records, {len(self._built)} built)"

    def __reduce__(self):
        """Pickle this view's rows of the table (compact Arrow), not its built objects."""
        table = self._table.take(_indices(self._rows))
        return (LazyRecords, (table, self._build), {"_site": self._site, "_hard": self._hard})

    def __setstate__(self, state: dict) -> None:
        self._site, self._hard = state["_site"], state["_hard"]


def stay_ids(records: Sequence[PatientRecord]) -> list[str]:
    """Every record's stay id; read from the column when the records are lazy."""
    if isinstance(records, LazyRecords):
        return records.stay_ids()
    return [r.stay_id for r in records]


def labels(records: Sequence[PatientRecord]) -> list[int]:
    if isinstance(records, LazyRecords):
        return records.labels()
    return [r.label for r in records]


def site_ids(records: Sequence[PatientRecord]) -> list[str | None]:
    if isinstance(records, LazyRecords):
        return records.site_ids()
    return [r.site_id for r in records]


def take(records: Sequence[PatientRecord], positions: Sequence[int] | np.ndarray
         ) -> Sequence[PatientRecord]:  # fmt: skip
    """The records at `positions`: a view when lazy, else a list."""
    if isinstance(records, LazyRecords):
        return records.take(positions)
    return [records[int(i)] for i in positions]

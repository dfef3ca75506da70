"""eICU tables → records, with the big tables read by DuckDB (`eicu:DIR`).

The full eICU database has about 14 million rows in the four event tables the text uses
(medication 7.3 M, treatment 3.7 M, diagnosis 2.7 M, admissionDx 0.6 M); the row-by-row reader
(`common.data.eicu_python`, `eicu:DIR?engine=python`) spends about a minute and a half in
Python on them. Here DuckDB reads each table once, keeps the labelled stays, and orders and
de-duplicates each stay's items in native code.

Why the records stay exactly those of the row-by-row reader: every value the text uses still
goes through that reader's own functions (`_clean`, `_admission_item`, `_offset`,
`format_number`), applied once to each DISTINCT raw value DuckDB finds (thousands, against
millions of rows) and joined back. The patient and hospital tables (one row per stay or
hospital) are read by the reference functions themselves. Where DuckDB's CSV dialect differs
from Python's (`_check_dialect`: a space before an opening quote), or a value those functions
refuse, or anything DuckDB rejects (invalid UTF-8 anywhere in a line included), the whole load
goes to the row-by-row reader, whose error names the file, line and column (this path has no
line numbers). `tests/test_data_eicu.py` compares both on the real demo and on awkward input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from common.data import chunked, cohort_cache, duck, eicu_python, progress
from common.data.eicu_python import APACHE_HOURS, PHYSIOLOGY_COLUMNS, TABLES, TIMELINES
from common.data.tables import find_table
from common.errors import FedmergeError
from common.records import PatientRecord

SOURCE = "eicu"
ENGINES = ("duckdb", "python")


class _RowByRow(Exception):
    """A value this path cannot vouch for: the row-by-row reader decides (and names the line)."""


def load_eicu(
    directory: Path, *, site: str = "region", hours: float = 24.0, cache: str | None = None,
    engine: str = "duckdb",
) -> Sequence[PatientRecord]:
    """Records of every labelled unit stay in an eICU export (plain or gzipped CSV tables).

    The finished cohort is kept as an Arrow file (`common.data.cohort_cache`, keyed by the seven
    tables' fingerprints and the settings), so only the first load reads the tables.
    `engine="python"`: the row-by-row reference reader, uncached.
    """
    if not directory.is_dir():
        raise FedmergeError(f"{directory}: eICU directory not found")
    if site not in {"region", "hospital"}:
        raise FedmergeError(f"eicu:{directory}: option site='{site}', expected region or hospital")
    if engine not in ENGINES:
        raise FedmergeError(
            f"eicu:{directory}: option engine='{engine}', expected duckdb (the query engine) "
            "or python (the row-by-row reference)"
        )
    files = [find_table(directory, name) for name in TABLES]
    if engine == "python":
        with progress.step(SOURCE, "reading the tables row by row"):
            return eicu_python.load_eicu_python(directory, site=site, hours=hours)
    store = cohort_cache.cache_dir(directory, cache)
    key = cohort_cache.cache_key(SOURCE, files, {"site": site, "hours": hours})
    table = cohort_cache.read_cached(store, key)
    if table is not None:
        progress.say(f"eicu: cohort from cache {cohort_cache.cached_path(store, key)}")
        return cohort_cache.table_to_records(table)
    with progress.step(SOURCE, "reading the tables"):
        table = _load(directory, site=site, hours=hours)
    cohort_cache.write_cached(store, key, table)
    return cohort_cache.table_to_records(table)


def _load(directory: Path, *, site: str, hours: float) -> pa.Table:
    import duckdb

    try:
        return cohort_table(directory, site=site, hours=hours)
    except (_RowByRow, duckdb.Error, FedmergeError):
        progress.say("eicu: a value the query engine cannot vouch for; reading row by row")
        records = eicu_python.load_eicu_python(directory, site=site, hours=hours)
        return cohort_cache.records_to_table(records)


def cohort_table(directory: Path, *, site: str, hours: float) -> pa.Table:
    """The cohort as a `cohort_cache` table, by the DuckDB path alone (raises `_RowByRow`
    where the reference reader must decide)."""
    patient_path, stays = eicu_python._patients(directory)
    sites = eicu_python._sites(directory, stays, site)
    end = hours * 60.0
    with duck.connect() as con:
        # Ties in offset are broken by file order, as the reference does by line.
        con.execute("SET preserve_insertion_order = true")
        labelled = set(stays)
        physiology = (_physiology(con, find_table(directory, "apacheApsVar"), labelled)
                      if hours >= APACHE_HOURS else {})
        admission = _timeline(con, directory, TIMELINES["admission"], end, labelled,
                              header=None)
        sentences = {
            name: _timeline(con, directory, TIMELINES[name], end, labelled, header=header)
            for name, header, _ in eicu_python.SENTENCES
        }
    names, texts, numeric = [], [], []
    for _, sections in eicu_python.stay_sections(patient_path, stays, physiology, admission,
                                                 sentences):
        names.append([n for n, _, _ in sections])
        texts.append([t for _, t, _ in sections])
        numeric.append([k for _, _, k in sections])
    return pa.table({
        "stay_id": pa.array(list(stays), pa.string()),
        "site_id": pa.array([sites[stay] for stay in stays], pa.string()),
        "label": pa.array([int(row["label"]) for row in stays.values()], pa.int8()),
        "names": names,
        "texts": texts,
        "numeric": numeric,
    })  # fmt: skip


def _check_dialect(con, path: Path) -> None:
    """Refuse (to the reference) a table DuckDB would read differently from Python's `csv`.

    One difference was found: a field of spaces then a quote (`1, "X",2`). DuckDB reads it
    as the quoted X; Python keeps the spaces and the quote characters as text, and splits at
    a comma inside. Such a table goes to the row-by-row reader. The same pass reads every
    line as text, so invalid UTF-8 anywhere (also in a column the text never uses, which the
    column scan does not decode) fails here as it fails in the reference."""
    sql = (f"SELECT count(*) FROM read_csv({duck.sql_string(str(path))}, header = false, "
           "auto_detect = false, delim = '\x1f', quote = '', escape = '', strict_mode = false, "
           "columns = {'line': 'VARCHAR'}) "
           "WHERE contains(line, ' \"') AND regexp_matches(line, '(^|,) +\"')")
    if con.sql(sql).fetchall()[0][0]:
        raise _RowByRow


def _read_kept(con, path: Path, columns: Sequence[str], labelled: set[str]) -> None:
    """`kept_` (see `_keep_labelled`) from the table at `path`, its first column the stay id:
    a gzipped table is inflated once (`chunked.inflated`) for the dialect check and the read,
    which DuckDB then parses on every core."""
    with chunked.inflated(path) as plain:
        _check_dialect(con, plain)
        _keep_labelled(con, _text_scan(plain, columns), columns[0], labelled)


def _text_scan(path: Path, columns: Sequence[str]) -> str:
    """`columns` of `path` as text, a blank field as '' (Python's csv gives '' for both a
    blank and a quoted empty field; DuckDB gives NULL for the first)."""
    src = duck.scan(path, {c: "VARCHAR" for c in columns})
    picked = ", ".join(f'coalesce("{c}", \'\') AS "{c}"' for c in columns)
    return f"(SELECT row_number() OVER () AS row_, {picked} FROM {src})"


def _map_distinct(con, name: str, sql: str, keys: Sequence[str], fn: Callable, out: str,
                  out_type) -> None:
    """Register `name`: each distinct row of `sql` (its `keys`) with `fn(*values)` as `out`
    (rows where fn gives None are left out)."""
    quoted = ", ".join(f'"{k}"' for k in keys)
    distinct = con.sql(f"SELECT DISTINCT {quoted} FROM {sql}").fetchall()
    kept = [(row, value) for row in distinct if (value := fn(*row)) is not None]
    columns = {k: pa.array([row[i] for row, _ in kept], pa.string()) for i, k in enumerate(keys)}
    columns[out] = pa.array([value for _, value in kept], out_type)
    con.register(name, pa.table(columns))


INT64 = (-(2**63), 2**63 - 1)


def _offset(raw: str) -> int | None:
    """The reference's offset rule; a value it would refuse, or one beyond a 64-bit integer
    (the reference keeps it as a Python int), goes to the reference."""
    try:
        value = eicu_python._offset(raw, "")
    except FedmergeError:
        raise _RowByRow from None
    if value is not None and not INT64[0] <= value <= INT64[1]:
        raise _RowByRow
    return value


def _timeline(con, directory: Path, spec: tuple, end: float, labelled: set[str], *,
              header: str | None) -> dict:
    """Stay → its items recorded before `end` minutes, ordered by (offset, line), each once
    (the reference's `_Timeline`): as a list, or with `header` as the reference's sentence."""
    table, columns, render = spec
    stay_col, offset_col, *payload = columns
    _read_kept(con, find_table(directory, table), columns, labelled)
    keys = ", ".join(f'"{c}"' for c in payload)
    _map_distinct(con, "items_", "kept_", payload, lambda *v: render(("", "", *v)) or None,
                  "item_", pa.string())
    _map_distinct(con, "offsets_", f"(SELECT kept_.* FROM kept_ JOIN items_ USING ({keys}))",
                  [offset_col], _offset, "offset_", pa.int64())
    ordered = "list(item_ ORDER BY offset_, row_)"
    value = ordered if header is None else (
        f"{duck.sql_string(header + ' ')} || array_to_string({ordered}, ' ; ') || ' .'")
    result = con.sql(f"""
        WITH placed AS (
            SELECT k.stay_, i.item_, o.offset_, k.row_ FROM kept_ k
            JOIN items_ i USING ({keys})
            JOIN offsets_ o USING ("{offset_col}")
            WHERE o.offset_ < {float(end)!r}
        ), first_ AS (
            SELECT stay_, item_, offset_, row_, row_number() OVER (
                PARTITION BY stay_, item_ ORDER BY offset_, row_) AS n_
            FROM placed
        )
        SELECT stay_, {value} AS value_ FROM first_ WHERE n_ = 1 GROUP BY stay_
    """).to_arrow_table()
    return dict(zip(result.column(0).to_pylist(), result.column(1).to_pylist(), strict=True))


def _keep_labelled(con, scan: str, stay_col: str, labelled: set[str]) -> None:
    """`kept_`: the rows of `scan` whose stay id, stripped as the reference strips it, is a
    labelled stay (with that id as `stay_`). One pass: an id equal to a labelled one joins
    directly; an id that is not plain digits (spaces around it, say) is kept aside and mapped
    through Python's strip, as the reference does."""
    con.register("labelled_", pa.table({"stay_": pa.array(sorted(labelled), pa.string())}))
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE kept_ AS
        SELECT t.*, l.stay_ FROM {scan} t LEFT JOIN labelled_ l ON t."{stay_col}" = l.stay_
        WHERE l.stay_ IS NOT NULL OR NOT regexp_full_match(t."{stay_col}", '[0-9]+')
    """)
    if not con.sql("SELECT count(*) FROM kept_ WHERE stay_ IS NULL").fetchall()[0][0]:
        return
    _map_distinct(con, "odd_", "(SELECT * FROM kept_ WHERE stay_ IS NULL)", [stay_col],
                  lambda raw: s if (s := raw.strip()) in labelled else None, "odd_stay_",
                  pa.string())
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE kept_ AS
        SELECT k.* REPLACE (coalesce(k.stay_, o.odd_stay_) AS stay_)
        FROM kept_ k LEFT JOIN odd_ o USING ("{stay_col}")
        WHERE k.stay_ IS NOT NULL OR o.odd_stay_ IS NOT NULL
    """)


def _physiology(con, path: Path, labelled: set[str]) -> dict[str, str]:
    """Stay → its APACHE sentence (the reference's `_physiology`: per row, each value through
    `physiology_item`, in column order; the last row of a stay with any item wins)."""
    _read_kept(con, path, PHYSIOLOGY_COLUMNS, labelled)
    order = PHYSIOLOGY_COLUMNS[1:]

    def item(column: str, raw: str) -> str | None:
        try:
            return eicu_python.physiology_item(column, raw, "")
        except FedmergeError:
            raise _RowByRow from None

    listed = ", ".join(f'"{c}"' for c in order)
    unpivot = (f"(UNPIVOT (SELECT row_, stay_, {listed} FROM kept_) ON {listed} "
               "INTO NAME column_ VALUE raw_)")
    _map_distinct(con, "aps_items_", unpivot, ["column_", "raw_"], item, "item_", pa.string())
    con.register("aps_order_", pa.table({"column_": list(order), "i_": range(len(order))}))
    result = con.sql(f"""
        WITH per_row AS (
            SELECT u.stay_, u.row_, list(m.item_ ORDER BY o.i_) AS items_
            FROM {unpivot} u
            JOIN aps_items_ m USING (column_, raw_)
            JOIN aps_order_ o USING (column_)
            GROUP BY u.stay_, u.row_
        )
        SELECT stay_, arg_max(items_, row_) FROM per_row GROUP BY stay_
    """).fetchall()
    return {stay: eicu_python._sentence(eicu_python.PHYSIOLOGY_HEADER, list(items))
            for stay, items in result}

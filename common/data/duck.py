"""DuckDB, the embedded query engine the clinical loaders read their CSV exports with.

MIMIC-IV's chartevents alone has about 313 million rows; a row-by-row Python reader takes about
an hour for it. DuckDB reads the CSV (or CSV.gz) in place, filters, joins and aggregates in
native code, and spills to disk past its memory limit, so a 24 GiB machine is enough.
(Measured against Polars on the same generated export before choosing: see
`bench/engine_choice.py` and docs/ARCHITECTURE.md.)

Every table goes through `scan`: the header is checked first (a missing column names file and
column before any long read), the needed columns are read as text and cast to the declared
types by DuckDB, and a value that does not convert becomes one `FedmergeError` naming the
file, line, column and value instead of DuckDB's multi-line report.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from common.data.tables import open_text
from common.errors import FedmergeError

if TYPE_CHECKING:  # imported when a table is first read, so a cached cohort never loads DuckDB
    import duckdb

# Settings a user may need on a shared or small machine; the defaults keep DuckDB well under a
# 24 GiB machine's memory while leaving room for the model that scores the records afterwards.
MEMORY_ENV = "FEDMERGE_DUCKDB_MEMORY"
THREADS_ENV = "FEDMERGE_DUCKDB_THREADS"
DEFAULT_MEMORY = "6GB"

_TYPE_WORDS = {
    "TIMESTAMP": "a timestamp (YYYY-MM-DD HH:MM:SS)",
    "DATE": "a date (YYYY-MM-DD)",
    "DOUBLE": "a number",
    "BIGINT": "a whole number",
    "INTEGER": "a whole number",
}


def header(path: Path) -> list[str]:
    """The column names of a CSV table (first line only, so a bad file fails at once).

    Read once per file version: the chunked chartevents read scans the same gzipped file's
    header for every chunk (about 240 of 128 MiB on the full table)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise FedmergeError(f"{path}: cannot read the header row ({exc})") from None
    return list(_header(str(path), stat.st_size, stat.st_mtime_ns))


@lru_cache(maxsize=64)
def _header(path_str: str, _size: int, _mtime_ns: int) -> tuple[str, ...]:
    import csv

    path = Path(path_str)
    with open_text(path) as handle:
        try:
            row = next(csv.reader(handle))
        except StopIteration:
            raise FedmergeError(f"{path}: file is empty (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError, EOFError, OSError) as exc:
            raise FedmergeError(f"{path}: cannot read the header row ({exc})") from None
    return tuple(name.strip() for name in row)


def check_columns(path: Path, columns: Mapping[str, str] | list[str]) -> list[str]:
    """Refuse a table lacking any of `columns`; returns the header for callers that need it."""
    names = header(path)
    wanted = list(columns)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise FedmergeError(
            f"{path}: missing column '{missing[0]}' (expected columns: {', '.join(wanted)})"
        )
    return names


def sql_string(text: str) -> str:
    """`text` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def scan(path: Path, columns: Mapping[str, str], read: Path | None = None) -> str:
    """SQL for a relation with exactly `columns` (name → DuckDB type) of the CSV at `path`.

    Every column of the header is declared (the needed ones with their type, the rest as
    text) and DuckDB's sniffer is off: nothing is guessed from a sample, so a value far down a
    313-million-row file cannot contradict a guess, and unused columns are never converted.
    `read` is a file with the same header to read instead (an uncompressed chunk of `path`).
    """
    names = check_columns(path, columns)
    declared = ", ".join(
        f"{sql_string(n)}: {sql_string(columns.get(n, 'VARCHAR'))}" for n in names
    )
    select = ", ".join(f'"{name}"' for name in columns)
    return (
        f"(SELECT {select} FROM read_csv({sql_string(str(read or path))}, header = true, "
        f"auto_detect = false, delim = ',', quote = '\"', escape = '\"', "
        f"columns = {{{declared}}}))"
    )


_LINE = re.compile(r"CSV Error on Line: (\d+)")
_COLUMN = re.compile(r'converting column "([^"]+)"')
_VALUE = re.compile(r"Could not convert string \"(.*?)\" to '([A-Z]+)")
_FILE = re.compile(r"^\s*file = (.+)$", re.MULTILINE)


def explain(exc: duckdb.Error, context: str, chunk: tuple[str, int] | None = None
            ) -> FedmergeError:  # fmt: skip
    """One line for a DuckDB error: the file, line, column and value where it can tell.

    `chunk` = (original file, line offset) when DuckDB read an uncompressed chunk of that file
    (`common.data.chunked`): the report names the original file and its line.
    """
    text = str(exc)
    file_match = _FILE.search(text)
    where = file_match.group(1).strip() if file_match else context
    where = chunk[0] if chunk else where
    line = _LINE.search(text)
    column = _COLUMN.search(text)
    value = _VALUE.search(text)
    if column and value:
        at = f"line {int(line.group(1)) + (chunk[1] if chunk else 0)}, " if line else ""
        expected = _TYPE_WORDS.get(value.group(2), value.group(2).lower())
        return FedmergeError(
            f"{where}: {at}column '{column.group(1)}': '{value.group(1)}' is not {expected}"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if chunk:  # a structural error (quote, column count): its line is the chunk's
        first = _LINE.sub(lambda m: f"CSV Error on Line: {int(m.group(1)) + chunk[1]}", first)
    return FedmergeError(f"{where}: {first}")


@contextmanager
def connect(spill: Path | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with a memory cap, spilling to `spill` when given."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit = '{os.environ.get(MEMORY_ENV, DEFAULT_MEMORY)}'")
        threads = os.environ.get(THREADS_ENV)
        if threads:
            con.execute(f"SET threads = {int(threads)}")
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET enable_progress_bar = false")
        if spill is not None:
            spill.mkdir(parents=True, exist_ok=True)
            con.execute(f"SET temp_directory = {sql_string(str(spill))}")
        yield con
    finally:
        con.close()


def run(con: duckdb.DuckDBPyConnection, sql: str, context: str,
        chunk: tuple[str, int] | None = None) -> None:  # fmt: skip
    """Execute `sql`; any DuckDB failure becomes one FedmergeError (see `explain`)."""
    import duckdb

    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise explain(exc, context, chunk) from None


def rows(con: duckdb.DuckDBPyConnection, sql: str, context: str) -> list[tuple]:
    import duckdb

    try:
        return con.execute(sql).fetchall()
    except duckdb.Error as exc:
        raise explain(exc, context) from None


def arrow(con: duckdb.DuckDBPyConnection, sql: str, context: str):
    """The result of `sql` as a pyarrow Table."""
    import duckdb

    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise explain(exc, context) from None

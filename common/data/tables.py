"""Stream rows of CSV tables (plain or gzip) with the header checked once, up front.

Clinical exports are large (MIMIC-IV chartevents has hundreds of millions of rows) and pandas
is not a dependency, so loaders read row by row with the stdlib `csv` module and keep only what
survives their filters. Checking the header before the first row means a missing column fails
immediately with the file and column named, not halfway through a long read.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from operator import itemgetter
from pathlib import Path

from common.errors import FedmergeError

# Some exports carry very long free-text fields; the csv default of 128 KiB is too small.
csv.field_size_limit(1 << 27)


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently decompressing `.gz`."""
    if not path.is_file():
        raise FedmergeError(f"{path}: file not found")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - caller closes


def find_table(directory: Path, name: str) -> Path:
    """`name.csv` or `name.csv.gz` inside `directory`; a clear error when neither exists."""
    for candidate in (directory / f"{name}.csv", directory / f"{name}.csv.gz"):
        if candidate.is_file():
            return candidate
    raise FedmergeError(f"{directory / name}.csv(.gz): table '{name}' not found in {directory}")


def read_columns(path: Path, columns: Sequence[str]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yield `(line_number, values)` with `values` in the order of `columns`.

    The line number is the file's physical line (header = line 1), so error messages point at a
    line a user can open in an editor.
    """
    with open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise FedmergeError(f"{path}: file is empty (expected a header row)") from None
        except (csv.Error, UnicodeDecodeError, EOFError, OSError) as exc:
            raise FedmergeError(f"{path}: cannot read the header row ({exc})") from None
        index = {name.strip(): i for i, name in enumerate(header)}
        missing = [c for c in columns if c not in index]
        if missing:
            raise FedmergeError(
                f"{path}: missing column '{missing[0]}' (expected columns: {', '.join(columns)})"
            )
        positions = [index[c] for c in columns]
        getter = itemgetter(*positions)
        pick = getter if len(positions) > 1 else (lambda row: (getter(row),))
        try:
            for row in reader:
                try:
                    values = pick(row)
                except IndexError:
                    if not row:
                        continue
                    raise FedmergeError(
                        f"{path}: line {reader.line_num} has {len(row)} fields, "
                        f"expected {len(header)}"
                    ) from None
                yield reader.line_num, values
        except (csv.Error, UnicodeDecodeError, EOFError, OSError) as exc:
            raise FedmergeError(f"{path}: unreadable near line {reader.line_num} ({exc})") from None

"""Already-rendered patient text: `jsonl` or `csv` files with `text` and `label` (and optional
`id`, `site`), the shape the HF Mimic4Dataset text encoding and most exports produce.

Rows are validated one by one so that the first bad row is reported with its line number;
records from these files carry no sections, so the hard variant is not available for them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.data.tables import open_text
from common.errors import FedmergeError
from common.records import PatientRecord


def parse_label(value: Any, where: str) -> int:
    """0/1 from an int, an integral float or the strings "0"/"1"; anything else is refused."""
    if isinstance(value, bool):
        raise FedmergeError(f"{where}: field 'label' is {value!r}, expected 0 or 1")
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in {"0", "1"}:
        return int(value.strip())
    raise FedmergeError(f"{where}: field 'label' is {value!r}, expected 0 or 1")


def _record(fields: dict[str, Any], row_index: int, where: str) -> PatientRecord:
    text = fields.get("text")
    if not isinstance(text, str):
        raise FedmergeError(f"{where}: field 'text' is {text!r}, expected a string")
    label = parse_label(fields.get("label"), where)
    if "id" in fields:
        stay_id = fields["id"]
        if isinstance(stay_id, bool) or not isinstance(stay_id, str | int) or not str(stay_id):
            raise FedmergeError(f"{where}: field 'id' is {stay_id!r}, expected a non-empty id")
        stay_id = str(stay_id).strip()
        if not stay_id:
            raise FedmergeError(f"{where}: field 'id' is blank, expected a non-empty id")
    else:
        # Without ids, the row position is the only stable identity (and what folds hash).
        stay_id = str(row_index)
    site = fields.get("site")
    site_id = None if site is None or str(site).strip() == "" else str(site).strip()
    return PatientRecord(stay_id=stay_id, site_id=site_id, label=label, text=text)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedmergeError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(fields, dict):
                raise FedmergeError(f"{where}: expected a JSON object with 'text' and 'label'")
            for required in ("text", "label"):
                if required not in fields:
                    raise FedmergeError(f"{where}: missing field '{required}'")
            yield where, fields


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise FedmergeError(f"{path}: file is empty (expected a header with text,label)")
        header = [h.strip() for h in header]
        for required in ("text", "label"):
            if required not in header:
                raise FedmergeError(
                    f"{path}: missing column '{required}' (header: {', '.join(header)})"
                )
        wanted = {"text", "label", "id", "site"}
        keep = [(i, name) for i, name in enumerate(header) if name in wanted]
        for row in reader:
            if not row:
                continue
            where = f"{path}: line {reader.line_num}"
            if len(row) != len(header):
                raise FedmergeError(f"{where}: {len(row)} fields, expected {len(header)}")
            yield where, {name: row[i] for i, name in keep}


def load_serialized(path: Path, fmt: str) -> list[PatientRecord]:
    """Load a `jsonl` or `csv` file; ids must be unique and the file must hold a record."""
    rows = _jsonl_rows(path) if fmt == "jsonl" else _csv_rows(path)
    try:
        records = _collect(rows)
    except (csv.Error, UnicodeDecodeError, EOFError, OSError) as exc:
        raise FedmergeError(f"{path}: unreadable as {fmt} ({exc})") from None
    if not records:
        raise FedmergeError(f"{path}: no records (expected at least one row with text and label)")
    return records


def _collect(rows: Iterator[tuple[str, dict[str, Any]]]) -> list[PatientRecord]:
    records: list[PatientRecord] = []
    seen: dict[str, str] = {}
    for index, (where, fields) in enumerate(rows):
        record = _record(fields, index, where)
        if record.stay_id in seen:
            raise FedmergeError(
                f"{where}: duplicate id '{record.stay_id}' (first seen at {seen[record.stay_id]})"
            )
        seen[record.stay_id] = where.rsplit(": ", 1)[-1]
        records.append(record)
    return records

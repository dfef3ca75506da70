"""jsonl/csv loaders and the spec dispatcher: round trips, and one clear error per bad input."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from common.data import load_records, parse_spec
from common.errors import FedmergeError

ROWS = [
    {"id": "a1", "site": "north", "text": "The patient is diagnosed with sepsis.", "label": 1},
    {"id": "a2", "site": "", "text": "The outputs collected are :Urine.", "label": 0},
    {"id": "a3", "site": "south", "text": 'quoted "text", with comma', "label": 0},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_csv(path, rows, header=("id", "site", "text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[row.get(c, "") for c in header] for row in rows])
    return path


def expected(rows):
    return [(r["id"], r["site"] or None, r["label"], r["text"]) for r in rows]


def as_tuples(records):
    return [(r.stay_id, r.site_id, r.label, r.text) for r in records]


def test_jsonl_csv_and_gzip_round_trip(tmp_path):
    jsonl = load_records(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl', ROWS)}")
    gz = load_records(f"jsonl:{write_jsonl(tmp_path / 'd.jsonl.gz', ROWS, gzip.open)}")
    from_csv = load_records(f"csv:{write_csv(tmp_path / 'd.csv', ROWS)}")
    assert as_tuples(jsonl) == as_tuples(gz) == as_tuples(from_csv) == expected(ROWS)


def test_without_ids_row_index_is_the_id_and_single_class_loads(tmp_path):
    rows = [{"text": f"t{i}", "label": "0"} for i in range(3)]
    path = write_csv(tmp_path / "d.csv", rows, header=("text", "label"))
    records = load_records(f"csv:{path}")
    got = [(r.stay_id, r.label, r.site_id) for r in records]
    assert got == [(str(i), 0, None) for i in range(3)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([ROWS[0], dict(ROWS[1], label=2)], r"d\.jsonl: line 2: field 'label' is 2, expected 0"),
        ([ROWS[0], dict(ROWS[1], label=True)], r"line 2: field 'label' is True"),
        ([ROWS[0], dict(ROWS[1], label="yes")], r"line 2: field 'label' is 'yes'"),
        ([ROWS[0], {"id": "x", "label": 1}], r"d\.jsonl: line 2: missing field 'text'"),
        ([*ROWS[:2], dict(ROWS[2], id="a1")], r"line 3: duplicate id 'a1' \(first seen at line 1"),
        ([ROWS[0], "{not json"], r"line 2: not valid JSON"),
        ([ROWS[0], "[1, 2]"], r"line 2: expected a JSON object"),
        ([ROWS[0], dict(ROWS[1], id="")], r"line 2: field 'id'"),
        ([], r"d\.jsonl: no records"),
    ],
)  # fmt: skip
def test_jsonl_bad_input(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(FedmergeError, match=message):
        load_records(f"jsonl:{path}")


def test_csv_bad_input(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS, header=("id", "text"))
    with pytest.raises(FedmergeError, match=r"d\.csv: missing column 'label'"):
        load_records(f"csv:{path}")
    path = write_csv(tmp_path / "e.csv", [ROWS[0], dict(ROWS[1], label="0.5")])
    with pytest.raises(FedmergeError, match=r"e\.csv: line 3: field 'label' is '0\.5'"):
        load_records(f"csv:{path}")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FedmergeError, match=r"empty\.csv: file is empty"):
        load_records(f"csv:{tmp_path / 'empty.csv'}")
    with pytest.raises(FedmergeError, match=r"absent\.csv: file not found"):
        load_records(f"csv:{tmp_path / 'absent.csv'}")


def test_hard_variant_refused_for_plain_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FedmergeError, match="hard variant needs structured sections"):
        load_records(f"jsonl:{path}", hard=True)


def test_spec_parsing():
    spec = parse_spec("eicu:/data/eicu?site=hospital&hours=48")
    assert (spec.kind, spec.location, spec.options) == (
        "eicu", "/data/eicu", {"site": "hospital", "hours": "48"},
    )  # fmt: skip
    assert parse_spec("synthetic:n=10?x=1").location == "n=10?x=1"
    for bad, message in [
        ("parquet:/x", "expected one of jsonl:, csv:"),
        ("/just/a/path", "expected one of"),
        ("csv:", "path after 'csv:' is empty"),
        ("eicu:/x?region=1", "unknown option 'region' for eicu:"),
        ("eicu:/x?garbage", "unknown option 'garbage'"),
        ("eicu:/x?&", "could not read options"),
    ]:
        with pytest.raises(FedmergeError, match=message):
            parse_spec(bad)
    # mimic4 windows are whole hours now (the pipeline's hourly buckets); eicu's stay real.
    with pytest.raises(FedmergeError, match="option 'hours=-3' must be a whole number >= 1"):
        load_records("mimic4:/nowhere?hours=-3")
    with pytest.raises(FedmergeError, match="option 'hours=-3' must be a positive number"):
        load_records("eicu:/nowhere?hours=-3")
    with pytest.raises(FedmergeError, match="option 'demographics=maybe'"):
        load_records("mimic4:/nowhere?demographics=maybe")


def test_not_gzip_or_not_utf8(tmp_path):
    (tmp_path / "d.jsonl.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(FedmergeError, match=r"d\.jsonl\.gz: unreadable as jsonl"):
        load_records(f"jsonl:{tmp_path / 'd.jsonl.gz'}")
    (tmp_path / "d.csv").write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(FedmergeError, match=r"d\.csv: unreadable as csv"):
        load_records(f"csv:{tmp_path / 'd.csv'}")


def test_synthetic_dispatches_to_the_built_in_cohort():
    from common.data.synthetic import load_synthetic

    records = load_records("synthetic:sites=2,stays=6,seed=3")
    assert records == load_synthetic("sites=2,stays=6,seed=3")
    hard = load_records("synthetic:sites=2,stays=6,seed=3", hard=True)
    assert [r.text for r in hard] == [r.hard().text for r in records]

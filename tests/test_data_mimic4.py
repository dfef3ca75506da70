"""MIMIC-IV loader on a hand-built export in MIMIC-IV 2.2's own table and column names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mimic4_fixture import (
    COLUMNS,
    EXPECTED,
    ROWS,
    S1_DIAGNOSES,
    S1_NUMERIC,
    write_mimic4,
    write_table,
)

from common.data import load_records
from common.errors import FedmergeError


@pytest.fixture(scope="session")
def mimic_dir(tmp_path_factory) -> Path:
    return write_mimic4(tmp_path_factory.mktemp("mimic4"))


@pytest.fixture
def mimic_copy(mimic_dir, tmp_path) -> Path:
    """A private copy a test may damage."""
    return Path(shutil.copytree(mimic_dir, tmp_path / "mimic4"))


def test_adult_stays_labels_and_texts(mimic_dir):
    records = load_records(f"mimic4:{mimic_dir}")
    # 30003 is a child; 30005 turns 18 by the stay year (anchor_age 17 in 2100, stay in 2101).
    assert [r.stay_id for r in records] == ["30001", "30002", "30004", "30005"]
    for record in records:
        assert (record.label, record.text) == EXPECTED[record.stay_id], record.stay_id
        assert record.site_id is None


def test_label_follows_pipeline_date_rule(mimic_dir):
    labels = {r.stay_id: r.label for r in load_records(f"mimic4:{mimic_dir}")}
    assert labels["30001"] == 1  # dod is the outtime date: midnight <= outtime
    assert labels["30002"] == 0  # dod months after the stay
    assert labels["30004"] == 0  # dod the admission day, but midnight is before the 14:00 intime


def test_window_excludes_events_outside_first_48_hours(mimic_dir):
    text = {r.stay_id: r.text for r in load_records(f"mimic4:{mimic_dir}")}["30001"]
    # Heart rates 900 (before intime) and 500 (hour 49) would move the mean off 105.
    assert "105 for Heart Rate" in text
    assert "NaCl" not in text  # saline starts at hour 60


def test_hard_variant_keeps_numeric_sections(mimic_dir):
    hard = {r.stay_id: r for r in load_records(f"mimic4:{mimic_dir}", hard=True)}
    assert hard["30001"].text == S1_NUMERIC
    assert [s.name for s in hard["30001"].sections] == ["chart_events", "medications"]
    assert hard["30004"].text == ""


def test_demographics_prefix_and_options(mimic_dir):
    records = load_records(f"mimic4:{mimic_dir}?demographics=1&site=bidmc")
    first = records[0]
    assert first.text.startswith(
        f"The patient WHITE female, 70 years old, covered by Medicare was diagnosed with "
        f"{S1_DIAGNOSES}. The chart events"
    )
    assert {r.site_id for r in records} == {"bidmc"}
    short = load_records(f"mimic4:{mimic_dir}?hours=2")[0].text
    assert "100 for Heart Rate" in short and "Temperature" not in short  # 12:00 is hour 2


def test_all_tables_gzipped(tmp_path):
    root = write_mimic4(tmp_path / "gz", gzipped=tuple(COLUMNS))
    assert not list(root.rglob("*.csv"))
    records = load_records(f"mimic4:{root}")
    assert {r.stay_id: (r.label, r.text) for r in records} == EXPECTED


def test_missing_table(mimic_copy):
    (mimic_copy / "icu" / "outputevents.csv").unlink()
    with pytest.raises(FedmergeError, match=r"outputevents.*not found"):
        load_records(f"mimic4:{mimic_copy}")


def test_missing_column(mimic_copy):
    columns = [c for c in COLUMNS["icu/icustays"].split() if c != "outtime"]
    write_table(mimic_copy / "icu" / "icustays.csv", columns, ROWS["icu/icustays"])
    with pytest.raises(FedmergeError, match=r"icustays\.csv: missing column 'outtime'"):
        load_records(f"mimic4:{mimic_copy}")


def test_duplicate_stay_id(mimic_copy):
    rows = ROWS["icu/icustays"] + [ROWS["icu/icustays"][1]]
    write_table(mimic_copy / "icu" / "icustays.csv", COLUMNS["icu/icustays"].split(), rows)
    with pytest.raises(FedmergeError, match=r"icustays\.csv: line 7: duplicate stay_id '30002'"):
        load_records(f"mimic4:{mimic_copy}")


def test_bad_timestamp_names_line_and_column(mimic_copy):
    rows = [dict(ROWS["icu/chartevents"][0], charttime="yesterday")]
    write_table(mimic_copy / "icu" / "chartevents.csv.gz", COLUMNS["icu/chartevents"].split(), rows)
    with pytest.raises(FedmergeError, match=r"chartevents\.csv\.gz: line 2, column 'charttime'"):
        load_records(f"mimic4:{mimic_copy}")


def test_no_adult_stay(mimic_copy):
    rows = [r for r in ROWS["icu/icustays"] if r["stay_id"] == "30003"]
    write_table(mimic_copy / "icu" / "icustays.csv", COLUMNS["icu/icustays"].split(), rows)
    with pytest.raises(FedmergeError, match=r"icustays\.csv: no adult ICU stay"):
        load_records(f"mimic4:{mimic_copy}")


def test_missing_directory(tmp_path):
    with pytest.raises(FedmergeError, match="MIMIC-IV directory not found"):
        load_records(f"mimic4:{tmp_path / 'absent'}")


def test_other_timestamp_spellings_give_the_same_window(mimic_copy):
    # Text comparison is only a fast path for MIMIC's own spelling; others are parsed.
    rows = [
        dict(r, charttime=r["charttime"].replace(" ", "T") + ".000")
        for r in ROWS["icu/chartevents"]
    ]
    write_table(mimic_copy / "icu" / "chartevents.csv.gz", COLUMNS["icu/chartevents"].split(), rows)
    records = load_records(f"mimic4:{mimic_copy}")
    assert {r.stay_id: (r.label, r.text) for r in records} == EXPECTED

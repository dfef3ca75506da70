"""MIMIC-IV loader on a hand-built export in MIMIC-IV 2.2's own table and column names.

`EXPECTED` (tests/mimic4_fixture.py) is derived by hand from the healthylaife pipeline's rules;
`PREVIOUS` is the previous loader's output (kept as `engine=python`). Each difference between
the two is one rule, tested on its own below.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mimic4_fixture import (
    COLUMNS,
    EXPECTED,
    ICD_MAP,
    PREVIOUS,
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
    copy = Path(shutil.copytree(mimic_dir, tmp_path / "mimic4"))
    shutil.rmtree(copy / ".fedmerge-cache", ignore_errors=True)
    return copy


def texts(spec: str) -> dict[str, tuple[int, str]]:
    return {r.stay_id: (r.label, r.text) for r in load_records(spec)}


def test_pipeline_cohort_labels_and_texts(mimic_dir):
    records = load_records(f"mimic4:{mimic_dir}")
    assert [r.stay_id for r in records] == ["30001", "30002", "30004"]
    for record in records:
        assert (record.label, record.text) == EXPECTED[record.stay_id], record.stay_id
        assert record.site_id is None


def test_previous_loader_is_kept_as_the_python_engine(mimic_dir):
    assert texts(f"mimic4:{mimic_dir}?engine=python") == PREVIOUS


def test_every_difference_from_the_previous_loader_is_a_pipeline_rule(mimic_dir):
    new, old = texts(f"mimic4:{mimic_dir}"), PREVIOUS
    # Dropped stays: 30005 (anchor_age 17), 30006 (47.5 h), 30007 (no admissions row).
    assert set(old) - set(new) == {"30005", "30006", "30007"}
    assert set(new) <= set(old)
    # Changed texts: 30001 (ICD roots, outliers, medication filters), 30002 (2-hour buckets).
    assert {s for s in new if new[s] != old[s]} == {"30001", "30002"}
    assert all(new[s][0] == old[s][0] for s in new)  # the label rule is unchanged


def test_adult_by_anchor_age_not_by_stay_year(mimic_dir):
    # 30005's anchor_age is 17 in 2100; the previous loader aged it to 18 for its 2101 stay.
    assert "30005" in PREVIOUS and "30005" not in texts(f"mimic4:{mimic_dir}?hours=2")


def test_stays_shorter_than_window_plus_prediction_window_are_dropped(mimic_dir):
    assert "30006" not in texts(f"mimic4:{mimic_dir}")  # 47 whole hours < 48
    assert texts(f"mimic4:{mimic_dir}?hours=24")["30006"] == PREVIOUS["30006"]
    # 30002 and 30004 last exactly 48 h: a 1-hour prediction window drops them too.
    assert set(texts(f"mimic4:{mimic_dir}?pred_window=1")) == {"30001"}


def test_stay_without_admission_row_is_dropped(mimic_dir):
    assert "30007" in PREVIOUS and "30007" not in texts(f"mimic4:{mimic_dir}?hours=24")


def test_chart_outliers_removed_at_the_98th_percentile(mimic_dir):
    kept = texts(f"mimic4:{mimic_dir}?outlier=100")["30001"][1]
    # With nothing removed: heart-rate buckets 100 | 1000 | 110, temperatures 98.6 and 99.1.
    assert "403.333 for Heart Rate;98.85 for Temperature Fahrenheit" in kept
    assert "105 for Heart Rate;98.6 for Temperature Fahrenheit" in EXPECTED["30001"][1]
    low = texts(f"mimic4:{mimic_dir}?outlier_low=50")["30002"][1]
    assert "Heart Rate" not in low  # 1 and 2 are below the median heart rate of the cohort


def test_means_are_over_time_buckets(mimic_dir):
    # 30002's heart rates 1 (hour 1) | 2, 2 (hours 2, 3): buckets of 2 h give (1 + 2) / 2.
    assert "1.5 for Heart Rate" in EXPECTED["30002"][1]
    assert "1.667 for Heart Rate" in texts(f"mimic4:{mimic_dir}?bucket=1")["30002"][1]
    with pytest.raises(FedmergeError, match=r"hours=3 is not a multiple of bucket=2"):
        load_records(f"mimic4:{mimic_dir}?hours=3")


def test_medications_need_a_rate_and_a_later_end_hour(mimic_dir):
    # The 10 mg bolus has no rate; the 500 mg of saline starts and ends in hour 6.
    assert "5.333 of Norepinephrine;500 of NaCl 0.9%" in PREVIOUS["30001"][1]
    assert "are :3 of Norepinephrine." in EXPECTED["30001"][1]


def test_icd10_grouped_to_three_character_roots(mimic_dir):
    # A419 and A410 share the root A41 (titled once), N179 becomes N17.
    assert EXPECTED["30001"][1].startswith(f"The patient is diagnosed with {S1_DIAGNOSES}.")
    assert S1_DIAGNOSES == "Other sepsis;Acute kidney failure"


def test_icd9_converted_with_the_users_mapping_file(mimic_copy, tmp_path):
    mapping = tmp_path / "ICD9_to_ICD10_mapping.txt"
    mapping.write_text(ICD_MAP)
    rows = ROWS["hosp/diagnoses_icd"] + [
        dict(subject_id="10002", hadm_id="20002", seq_num="2", icd_code="9999", icd_version="9")
    ]
    write_table(mimic_copy / "hosp/diagnoses_icd.csv", COLUMNS["hosp/diagnoses_icd"].split(), rows)
    plain = texts(f"mimic4:{mimic_copy}?cache=off")["30002"][1]
    assert plain.startswith("The patient is diagnosed with Congestive heart failure, "
                            "unspecified;ICD-9 9999.")  # fmt: skip
    mapped = texts(f"mimic4:{mimic_copy}?cache=off&icd_map={mapping}")["30002"][1]
    # 4280 → root 428 → I509 → I50; 9999 has no mapping and is dropped, as in the pipeline.
    assert mapped.startswith("The patient is diagnosed with Heart failure. The chart events")
    mapping.write_text("code\tten\n428\tI509\n")
    with pytest.raises(FedmergeError, match=r"mapping\.txt: missing column 'diagnosis_code'"):
        load_records(f"mimic4:{mimic_copy}?cache=off&icd_map={mapping}")


def test_rows_in_a_minority_unit_are_dropped(mimic_copy):
    extra = [dict(ROWS["icu/chartevents"][0], stay_id="30004", hadm_id="20004",
                  charttime="2140-05-10 15:00:00", itemid="223761", valuenum="98",
                  valueuom="°F") for _ in range(20)]  # fmt: skip
    # Twenty identical rows count once (the pipeline drops duplicates): vary the minutes.
    for minute, row in enumerate(extra):
        row["charttime"] = f"2140-05-10 15:{minute:02d}:00"
    celsius = dict(extra[0], charttime="2140-05-10 15:30:00", valuenum="37", valueuom="°C")
    write_table(mimic_copy / "icu/chartevents.csv.gz", COLUMNS["icu/chartevents"].split(),
                ROWS["icu/chartevents"] + extra + [celsius])  # fmt: skip
    text = texts(f"mimic4:{mimic_copy}?cache=off")["30004"][1]
    assert text.startswith("The chart events mesured are :98 for Temperature Fahrenheit.")
    share = texts(f"mimic4:{mimic_copy}?cache=off&outlier=100")["30004"][1]
    # With the Celsius row the bucket mean would be (20 * 98 + 37) / 21.
    assert share.startswith("The chart events mesured are :98 for Temperature")


def test_label_follows_pipeline_date_rule(mimic_dir):
    labels = {r.stay_id: r.label for r in load_records(f"mimic4:{mimic_dir}")}
    assert labels["30001"] == 1  # dod is the outtime date: midnight <= outtime
    assert labels["30002"] == 0  # dod months after the stay
    assert labels["30004"] == 0  # dod the admission day, but midnight is before the 14:00 intime


def test_window_excludes_events_outside_first_48_hours(mimic_dir):
    text = texts(f"mimic4:{mimic_dir}?outlier=100")["30001"][1]
    # Heart rates 900 (before intime) and 500 (hour 49) would move the bucket mean off 403.333.
    assert "403.333 for Heart Rate" in text
    assert "NaCl" not in text  # the remaining saline starts at hour 60


def test_hard_variant_keeps_numeric_sections(mimic_dir):
    hard = {r.stay_id: r for r in load_records(f"mimic4:{mimic_dir}", hard=True)}
    assert hard["30001"].text == S1_NUMERIC
    assert [s.name for s in hard["30001"].sections] == ["chart_events", "medications"]
    assert hard["30004"].text == ""


def test_demographics_prefix_and_options(mimic_dir):
    records = load_records(f"mimic4:{mimic_dir}?demographics=1&site=bidmc")
    assert records[0].text.startswith(
        f"The patient WHITE female, 70 years old, covered by Medicare was diagnosed with "
        f"{S1_DIAGNOSES}. The chart events"
    )
    assert {r.site_id for r in records} == {"bidmc"}
    short = load_records(f"mimic4:{mimic_dir}?hours=2")[0].text
    assert "100 for Heart Rate" in short and "Temperature" not in short  # 12:00 is hour 2


def test_all_tables_gzipped(tmp_path):
    root = write_mimic4(tmp_path / "gz", gzipped=tuple(COLUMNS))
    assert not list(root.rglob("*.csv"))
    assert texts(f"mimic4:{root}") == EXPECTED
    assert texts(f"mimic4:{root}?engine=python") == PREVIOUS


def test_second_load_comes_from_the_cache(mimic_copy, monkeypatch):
    monkeypatch.delenv("FEDMERGE_CACHE_DIR")  # the default: next to the export
    first = load_records(f"mimic4:{mimic_copy}")
    cached = list((mimic_copy / ".fedmerge-cache").glob("mimic4-*.arrow"))
    assert len(cached) == 1
    assert not [p for p in (mimic_copy / ".fedmerge-cache").iterdir() if p.suffix == ".tmp"]
    import common.data.mimic4 as mimic4

    def no_engine(*args, **kwargs):
        raise AssertionError("the cached cohort must not be rebuilt")

    build = mimic4._build
    monkeypatch.setattr(mimic4, "_build", no_engine)
    assert load_records(f"mimic4:{mimic_copy}") == first
    # A changed export or a changed setting is a different key: rebuilt, not served stale.
    monkeypatch.setattr(mimic4, "_build", build)
    table = mimic_copy / "icu/outputevents.csv"
    table.write_text(table.read_text().replace("Foley", "Foley", 1))
    os.utime(table, ns=(1, 1))
    assert load_records(f"mimic4:{mimic_copy}") == first
    load_records(f"mimic4:{mimic_copy}?bucket=1")
    assert len(list((mimic_copy / ".fedmerge-cache").glob("mimic4-*.arrow"))) == 3


def test_cache_location_options(mimic_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMERGE_CACHE_DIR")
    load_records(f"mimic4:{mimic_copy}?cache=off")
    assert not (mimic_copy / ".fedmerge-cache").exists()
    load_records(f"mimic4:{mimic_copy}?cache={tmp_path / 'mine'}")
    assert len(list((tmp_path / "mine").glob("mimic4-*.arrow"))) == 1
    monkeypatch.setenv("FEDMERGE_CACHE_DIR", str(tmp_path / "env"))
    load_records(f"mimic4:{mimic_copy}")
    assert len(list((tmp_path / "env").glob("mimic4-*.arrow"))) == 1


def test_a_cache_write_removes_the_caches_own_leftovers_only(mimic_copy, tmp_path):
    """Format-1 cohorts (Parquet, never read again) and a killed writer's day-old temporary
    file go when a cohort is written; anything else in a user-chosen folder stays."""
    mine = tmp_path / "mine"
    mine.mkdir()
    old = mine / f"mimic4-{'a' * 32}.parquet"
    torn = mine / f".mimic4-{'b' * 32}.x1y2.tmp"
    fresh = mine / f".mimic4-{'c' * 32}.z3.tmp"  # a writer may still be at work
    theirs = [mine / "notes.parquet", mine / f"other-{'a' * 31}.parquet"]
    for path in (old, torn, fresh, *theirs):
        path.write_text("x")
    os.utime(torn, (1, 1))
    load_records(f"mimic4:{mimic_copy}?cache={mine}")
    assert not old.exists() and not torn.exists()
    assert fresh.exists() and all(p.exists() for p in theirs)
    assert len(list(mine.glob("mimic4-*.arrow"))) == 1


def test_read_only_export_caches_in_the_user_cache_dir(mimic_copy, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMERGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    load_records(f"mimic4:{mimic_copy}")
    assert len(list((tmp_path / "xdg" / "fedmerge").glob("mimic4-*.arrow"))) == 1


def test_an_export_marked_read_only_is_not_written_even_by_root(mimic_copy, tmp_path,
                                                                  monkeypatch):
    """A shared data copy with every write bit taken away (as ../shared's eICU demo is): root
    may write there all the same, but the cache goes to the user cache folder."""
    monkeypatch.delenv("FEDMERGE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    mimic_copy.chmod(0o555)
    try:
        load_records(f"mimic4:{mimic_copy}")
        assert not (mimic_copy / ".fedmerge-cache").exists()
        assert len(list((tmp_path / "xdg" / "fedmerge").glob("mimic4-*.arrow"))) == 1
    finally:
        mimic_copy.chmod(0o755)


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
    with pytest.raises(FedmergeError, match=r"icustays\.csv: column 'stay_id': duplicate "
                       r"stay_id '30002'"):  # fmt: skip
        load_records(f"mimic4:{mimic_copy}")


def test_bad_timestamp_names_line_and_column(mimic_copy):
    rows = [dict(ROWS["icu/chartevents"][0], charttime="yesterday")]
    write_table(mimic_copy / "icu" / "chartevents.csv.gz", COLUMNS["icu/chartevents"].split(), rows)
    with pytest.raises(FedmergeError, match=r"chartevents\.csv\.gz: line 2, column 'charttime': "
                       r"'yesterday' is not a timestamp"):  # fmt: skip
        load_records(f"mimic4:{mimic_copy}")


def test_wrong_type_names_table_and_column(mimic_copy):
    rows = ROWS["icu/inputevents"] + [dict(ROWS["icu/inputevents"][0], amount="lots")]
    write_table(mimic_copy / "icu" / "inputevents.csv", COLUMNS["icu/inputevents"].split(), rows)
    with pytest.raises(FedmergeError, match=r"inputevents\.csv: line 7, column 'amount': "
                       r"'lots' is not a number"):  # fmt: skip
        load_records(f"mimic4:{mimic_copy}")


def test_chart_error_wins_when_tables_read_side_by_side_both_fail(mimic_copy):
    # chartevents and the other event tables are read concurrently; the report stays the same.
    chart = [dict(ROWS["icu/chartevents"][0], charttime="yesterday")]
    write_table(mimic_copy / "icu" / "chartevents.csv.gz", COLUMNS["icu/chartevents"].split(),
                chart)  # fmt: skip
    inputs = ROWS["icu/inputevents"] + [dict(ROWS["icu/inputevents"][0], amount="lots")]
    write_table(mimic_copy / "icu" / "inputevents.csv", COLUMNS["icu/inputevents"].split(),
                inputs)  # fmt: skip
    for _ in range(3):
        with pytest.raises(FedmergeError, match=r"chartevents\.csv\.gz: line 2, column "
                           r"'charttime': 'yesterday' is not a timestamp"):  # fmt: skip
            load_records(f"mimic4:{mimic_copy}?cache=off")


def test_records_are_built_with_the_collector_paused_then_restored():
    import gc

    from common.data.lazy import paused_gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError), paused_gc():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a caller's own choice is left as it was
    finally:
        gc.enable()


def test_unknown_item_names_table_and_column(mimic_copy):
    rows = [r for r in ROWS["icu/d_items"] if r["itemid"] != "226559"]
    write_table(mimic_copy / "icu" / "d_items.csv", COLUMNS["icu/d_items"].split(), rows)
    with pytest.raises(FedmergeError, match=r"outputevents\.csv: column 'itemid': '226559' has "
                       r"no row in .*d_items\.csv"):  # fmt: skip
        load_records(f"mimic4:{mimic_copy}")


def test_no_adult_stay(mimic_copy):
    rows = [r for r in ROWS["icu/icustays"] if r["stay_id"] == "30003"]
    write_table(mimic_copy / "icu" / "icustays.csv", COLUMNS["icu/icustays"].split(), rows)
    with pytest.raises(FedmergeError, match=r"icustays\.csv: no adult ICU stay"):
        load_records(f"mimic4:{mimic_copy}")


def test_missing_directory(tmp_path):
    with pytest.raises(FedmergeError, match="MIMIC-IV directory not found"):
        load_records(f"mimic4:{tmp_path / 'absent'}")


def test_bad_options(mimic_dir):
    with pytest.raises(FedmergeError, match=r"engine=python .* does not apply option 'bucket'"):
        load_records(f"mimic4:{mimic_dir}?engine=python&bucket=1")
    with pytest.raises(FedmergeError, match=r"option 'engine=spark' must be duckdb"):
        load_records(f"mimic4:{mimic_dir}?engine=spark")
    with pytest.raises(FedmergeError, match=r"option 'hours=1.5' must be a whole number"):
        load_records(f"mimic4:{mimic_dir}?hours=1.5")


def test_other_timestamp_spellings_give_the_same_window(mimic_copy):
    rows = [
        dict(r, charttime=r["charttime"].replace(" ", "T") + ".000")
        for r in ROWS["icu/chartevents"]
    ]
    write_table(mimic_copy / "icu" / "chartevents.csv.gz", COLUMNS["icu/chartevents"].split(), rows)
    assert texts(f"mimic4:{mimic_copy}") == EXPECTED


def test_a_cache_whose_labels_are_not_0_or_1_is_rebuilt_not_served(mimic_copy, monkeypatch):
    """Records are built when read, so the label column the node counts without building any
    is checked when the cache is opened: a damaged one is a slower load, never wrong counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import ipc

    monkeypatch.delenv("FEDMERGE_CACHE_DIR")
    first = load_records(f"mimic4:{mimic_copy}")
    (path,) = (mimic_copy / ".fedmerge-cache").glob("mimic4-*.arrow")
    with pa.memory_map(str(path)) as mapped:
        table = ipc.open_file(mapped).read_all()
    column = table.column_names.index("label")
    damaged = table.set_column(column, "label",
                               pc.add(table.column("label"), pa.scalar(2, pa.int8())))
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, damaged.schema) as out:
        out.write_table(damaged)
    rebuilt = []
    import common.data.mimic4 as mimic4

    build = mimic4._build
    monkeypatch.setattr(mimic4, "_build", lambda *a, **k: rebuilt.append(1) or build(*a, **k))
    assert load_records(f"mimic4:{mimic_copy}") == first
    assert rebuilt == [1]

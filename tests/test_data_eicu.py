"""eICU loader on the real eICU demo: counts, sites, units and, above all, no outcome leakage."""

from __future__ import annotations

import csv
import gzip
from collections import Counter
from pathlib import Path

import pytest

from common.data import load_records
from common.errors import FedmergeError

WINDOW = 24 * 60
# The tables the loader reads; a planted copy needs no others.
TABLES = (
    "patient", "hospital", "apacheApsVar", "admissionDx", "diagnosis", "medication", "treatment",
)  # fmt: skip
OUTCOME_WORDS = ("Expired", "Alive", "Death", "Home", "Nursing Home", "Rehabilitation")


def read(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def write(path: Path, rows: list[dict[str, str]], header: list[str]) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def demo(eicu_demo_dir):
    return load_records(f"eicu:{eicu_demo_dir}")


@pytest.fixture(scope="module")
def patients(eicu_demo_dir) -> dict[str, dict[str, str]]:
    return {r["patientunitstayid"]: r for r in read(eicu_demo_dir / "patient.csv.gz")}


def test_counts_labels_and_regions(demo, patients):
    assert len(demo) == 2492
    assert sum(r.label for r in demo) == 212
    for record in demo:
        status = patients[record.stay_id]["hospitaldischargestatus"]
        assert record.label == (status == "Expired")
    # Deaths by region as documented in the demo's README (every death is labelled).
    deaths = Counter(r.site_id for r in demo if r.label)
    assert deaths == {"Midwest": 58, "South": 63, "West": 50, "Northeast": 19, "Unknown": 22}


def test_site_hospital(eicu_demo_dir, patients):
    records = load_records(f"eicu:{eicu_demo_dir}?site=hospital")
    assert all(r.site_id == patients[r.stay_id]["hospitalid"] for r in records)
    assert len({r.site_id for r in records}) > 150


def test_physiology_with_units_and_missing_values_skipped(demo, eicu_demo_dir):
    aps = {r["patientunitstayid"]: r for r in read(eicu_demo_dir / "apacheApsVar.csv.gz")}
    by_id = {r.stay_id: r for r in demo}
    checked = 0
    for stay, row in aps.items():
        if stay not in by_id:
            continue
        text = by_id[stay].text
        if row["heartrate"] != "-1":
            assert f"heart rate {float(row['heartrate']):g} bpm" in text
            checked += 1
        if row["creatinine"] == "-1":
            assert "creatinine" not in text
        else:
            assert f"creatinine {float(row['creatinine']):g} mg/dL" in text
        assert " -1 " not in text
    assert checked > 2000


def test_no_outcome_or_discharge_value_in_text(demo):
    for record in demo:
        for word in OUTCOME_WORDS:
            assert word not in record.text, (record.stay_id, word)
        assert "discharge status" not in record.text.lower()


HEADERS = {
    "medications": "The medications started are : ",
    "treatments": "The treatments performed are : ",
    "diagnoses": "The patient is diagnosed with ",
}


def _section_items(record, name: str) -> set[str]:
    for section in record.sections:
        if section.name == name:
            assert section.text.startswith(HEADERS[name]) and section.text.endswith(" .")
            return set(section.text[len(HEADERS[name]) : -2].split(" ; "))
    return set()


def _late_only(rows, offset_key, item, window=WINDOW):
    """Per stay, items recorded only after the window (never inside it)."""
    early, late = set(), set()
    for row in rows:
        if not row[offset_key] or not item(row):
            continue
        key = (row["patientunitstayid"], item(row))
        (late if int(row[offset_key]) >= window else early).add(key)
    return late - early


def test_items_after_the_window_are_absent(demo, eicu_demo_dir):
    by_id = {r.stay_id: r for r in demo}
    leaf = lambda column: lambda r: " ".join(r[column].split("|")[-1].split())  # noqa: E731
    drug = lambda r: " ".join(r["drugname"].split()) if r["drugordercancelled"] != "Yes" else ""  # noqa: E731
    checked = 0
    for table, offset, item, section in (
        ("medication", "drugstartoffset", drug, "medications"),
        ("treatment", "treatmentoffset", leaf("treatmentstring"), "treatments"),
        ("diagnosis", "diagnosisoffset", leaf("diagnosisstring"), "diagnoses"),
    ):
        rows = read(eicu_demo_dir / f"{table}.csv.gz")
        late = {(s, i) for s, i in _late_only(rows, offset, item) if s in by_id}
        leaked = [(s, i) for s, i in late if i in _section_items(by_id[s], section)]
        assert not leaked[:5], table
        # Control: items recorded inside the window do show, so the check above has teeth.
        early = {(r["patientunitstayid"], item(r)) for r in rows if r[offset] and item(r)
                 and int(r[offset]) < WINDOW and r["patientunitstayid"] in by_id}  # fmt: skip
        assert all(i in _section_items(by_id[s], section) for s, i in early)
        assert len(late) > 300 and len(early) > 300, table
        checked += len(late)
    assert checked > 5000


@pytest.fixture(scope="module")
def planted(eicu_demo_dir, tmp_path_factory) -> Path:
    """A 12-stay copy of the demo with marked rows just inside and just after the window, and
    marked values in every outcome column of the patient table."""
    root = tmp_path_factory.mktemp("eicu_planted")
    first = read(eicu_demo_dir / "patient.csv.gz")
    stays = [r["patientunitstayid"] for r in first if r["hospitaldischargestatus"]][:12]
    for path in (eicu_demo_dir / f"{name}.csv.gz" for name in TABLES):
        rows = read(path)
        header = list(rows[0].keys())
        if "patientunitstayid" in header:
            rows = [r for r in rows if r["patientunitstayid"] in stays]
        if path.name == "patient.csv.gz":
            for r in rows:
                r.update(
                    hospitaldischargelocation="ZZHOSPLOC", unitdischargelocation="ZZUNITLOC",
                    dischargeweight="987.654", unitdischargeoffset="876543",
                    hospitaldischargeoffset="765432", unitstaytype="ZZSTAYTYPE",
                )  # fmt: skip
        stay = stays[0]
        extra = {
            "medication.csv.gz": [
                dict(patientunitstayid=stay, drugstartoffset="1439", drugname="ZZEARLYDRUG",
                     drugordercancelled="No"),
                dict(patientunitstayid=stay, drugstartoffset="1440", drugname="ZZLATEDRUG",
                     drugordercancelled="No"),
                dict(patientunitstayid=stay, drugstartoffset="100", drugname="ZZCANCELLED",
                     drugordercancelled="Yes"),
            ],
            "treatment.csv.gz": [
                dict(patientunitstayid=stay, treatmentoffset="2000", treatmentstring="x|ZZLATETX")
            ],
            "diagnosis.csv.gz": [
                dict(patientunitstayid=stay, diagnosisoffset="-30", diagnosisstring="x|ZZPREDX"),
                dict(patientunitstayid=stay, diagnosisoffset="5000", diagnosisstring="x|ZZLATEDX"),
            ],
            "admissionDx.csv.gz": [
                dict(patientunitstayid=stay, admitdxenteredoffset="3000",
                     admitdxpath="admission diagnosis|All Diagnosis|ZZLATEADMIT",
                     admitdxname="ZZLATEADMIT"),
            ],
        }.get(path.name, [])  # fmt: skip
        rows += [dict(dict.fromkeys(header, ""), **e) for e in extra]
        write(root / path.name, rows, header)
    return root


def test_planted_markers_respect_the_window(planted):
    records = load_records(f"eicu:{planted}")
    assert len(records) == 12
    everything = " ".join(r.text for r in records)
    assert "ZZEARLYDRUG" in everything and "ZZPREDX" in everything  # controls: the check can fail
    markers = ["ZZLATEDRUG", "ZZCANCELLED", "ZZLATETX", "ZZLATEDX", "ZZLATEADMIT"]
    markers += ["ZZHOSPLOC", "ZZUNITLOC", "ZZSTAYTYPE", "987.654", "876543", "765432"]
    for marker in markers:
        assert marker not in everything, marker
    longer = " ".join(r.text for r in load_records(f"eicu:{planted}?hours=48"))
    assert "ZZLATEDRUG" in longer and "ZZLATETX" in longer and "ZZLATEDX" not in longer


def test_hard_variant_and_short_window(planted):
    hard = load_records(f"eicu:{planted}", hard=True)
    assert all(s.numeric for r in hard for s in r.sections)
    assert any("The worst APACHE physiology" in r.text for r in hard)
    assert not any("diagnosed with" in r.text for r in hard)
    short = load_records(f"eicu:{planted}?hours=12")
    # APACHE day-1 values summarise 24 h: a 12-hour window must not show them.
    assert not any("APACHE" in r.text for r in short)


def _rewrite(src: Path, dst: Path, name: str, change) -> Path:
    import shutil

    shutil.copytree(src, dst)
    rows = read(dst / name)
    header = list(rows[0].keys())
    rows, header = change(rows, header)
    write(dst / name, rows, header)
    return dst


def test_bad_label(planted, tmp_path):
    def change(rows, header):
        rows[3]["hospitaldischargestatus"] = "Maybe"
        return rows, header

    bad = _rewrite(planted, tmp_path / "e", "patient.csv.gz", change)
    with pytest.raises(FedmergeError, match=r"patient\.csv\.gz: line 5: column "
                       r"'hospitaldischargestatus' is 'Maybe'"):  # fmt: skip
        load_records(f"eicu:{bad}")


def test_missing_column(planted, tmp_path):
    def change(rows, header):
        header = [h for h in header if h != "drugstartoffset"]
        return [{k: r[k] for k in header} for r in rows], header

    bad = _rewrite(planted, tmp_path / "e", "medication.csv.gz", change)
    with pytest.raises(FedmergeError, match=r"medication\.csv\.gz: missing column 'drugstart"):
        load_records(f"eicu:{bad}")


def test_duplicate_stay(planted, tmp_path):
    bad = _rewrite(planted, tmp_path / "e", "patient.csv.gz", lambda r, h: (r + r[:1], h))
    with pytest.raises(FedmergeError, match=r"patient\.csv\.gz: line 14: duplicate patientunit"):
        load_records(f"eicu:{bad}")


def test_no_labelled_stay(planted, tmp_path):
    def change(rows, header):
        for r in rows:
            r["hospitaldischargestatus"] = ""
        return rows, header

    bad = _rewrite(planted, tmp_path / "e", "patient.csv.gz", change)
    with pytest.raises(FedmergeError, match=r"patient\.csv\.gz: no stay with"):
        load_records(f"eicu:{bad}")


def test_missing_table_and_bad_site(planted, tmp_path):
    import shutil

    shutil.copytree(planted, tmp_path / "e")
    (tmp_path / "e" / "treatment.csv.gz").unlink()
    with pytest.raises(FedmergeError, match=r"treatment\.csv\(\.gz\): table 'treatment' not found"):
        load_records(f"eicu:{tmp_path / 'e'}")
    with pytest.raises(FedmergeError, match="expected region or hospital"):
        load_records(f"eicu:{planted}?site=ward")


# -- the query-engine path against the row-by-row reference ----------------------------------


@pytest.mark.parametrize("options", ["", "?site=hospital&hours=12"])
def test_duckdb_path_equals_the_row_by_row_reference_on_the_demo(eicu_demo_dir, options):
    from common.data.cohort_cache import table_to_records
    from common.data.eicu import cohort_table

    site = "hospital" if "hospital" in options else "region"
    hours = 12.0 if "hours=12" in options else 24.0
    fast = list(table_to_records(cohort_table(eicu_demo_dir, site=site, hours=hours)))
    sep = "&" if options else "?"
    reference = load_records(f"eicu:{eicu_demo_dir}{options}{sep}engine=python")
    assert len(fast) == len(reference) == 2492
    assert fast == list(reference)


@pytest.fixture(scope="module")
def awkward(planted, tmp_path_factory) -> Path:
    """The planted copy with what a CSV reader can get wrong: stay ids with spaces around them,
    items tied on offset (file order decides), the same item twice (kept once, at its first
    place), whitespace inside names, a quoted field across lines, a blank item, CRLF lines,
    and an APACHE value written as 88.50 and as -1 (not measured)."""
    import shutil

    root = tmp_path_factory.mktemp("eicu_awkward")
    for path in planted.iterdir():
        shutil.copy(path, root / path.name)
    stay = read(planted / "patient.csv.gz")[0]["patientunitstayid"]
    rows = read(root / "medication.csv.gz")
    header = list(rows[0].keys())
    blank = dict.fromkeys(header, "")
    rows += [
        dict(blank, patientunitstayid=f" {stay} ", drugstartoffset="5", drugname="ZZ  TIED B"),
        dict(blank, patientunitstayid=stay, drugstartoffset="5", drugname="ZZTIED A"),
        dict(blank, patientunitstayid=stay, drugstartoffset="7", drugname="ZZ TIED B"),
        dict(blank, patientunitstayid=stay, drugstartoffset="3.9", drugname="ZZ\nTWO LINES"),
        dict(blank, patientunitstayid=stay, drugstartoffset="2", drugname="   "),
        dict(blank, patientunitstayid=f"\t{stay}", drugstartoffset="", drugname="ZZNOOFFSET"),
    ]
    with gzip.open(root / "medication.csv.gz", "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    aps = read(root / "apacheApsVar.csv.gz")
    aps[0].update(heartrate="88.50", meanbp="-1", temperature="")
    write(root / "apacheApsVar.csv.gz", aps, list(aps[0].keys()))
    return root


def test_duckdb_path_equals_the_reference_on_awkward_csv(awkward):
    from common.data.cohort_cache import table_to_records
    from common.data.eicu import cohort_table

    fast = list(table_to_records(cohort_table(awkward, site="region", hours=24.0)))
    reference = list(load_records(f"eicu:{awkward}?engine=python"))
    assert fast == reference
    text = " ".join(r.text for r in fast)
    # The checks can fail: the awkward rows reached the text, in the reference's order.
    assert "ZZ TIED B ; ZZTIED A" in text and "ZZ TWO LINES" in text
    assert text.count("ZZ TIED B") == 1 and "ZZNOOFFSET" not in text
    assert "heart rate 88.5 bpm" in text


def test_a_value_the_rules_refuse_falls_back_to_the_reference_and_its_line(planted, tmp_path):
    """The query-engine path has no line numbers: a bad offset on a labelled stay's row sends
    the load to the row-by-row reader, whose error names the file, line and column."""
    stay = read(planted / "patient.csv.gz")[0]["patientunitstayid"]

    def change(rows, header):
        rows.insert(0, dict(dict.fromkeys(header, ""), patientunitstayid=stay,
                            treatmentoffset="soon", treatmentstring="x|ZZTX"))
        return rows, header

    bad = _rewrite(planted, tmp_path / "e", "treatment.csv.gz", change)
    with pytest.raises(FedmergeError, match=r"treatment\.csv\.gz: line 2, column "
                       r"'treatmentoffset': offset 'soon' is not a number of minutes"):
        load_records(f"eicu:{bad}?cache=off")


def _with_medication_lines(planted: Path, root: Path, lines: list[bytes]) -> Path:
    """The planted copy with raw `lines` appended to medication.csv (written uncompressed,
    byte for byte, where a CSV writer could not produce them)."""
    import shutil

    shutil.copytree(planted, root)
    with gzip.open(root / "medication.csv.gz", "rb") as handle:
        text = handle.read()
    (root / "medication.csv.gz").unlink()
    (root / "medication.csv").write_bytes(text + b"".join(lines))
    return root


def _medication_line(header: list[str], **values: str) -> bytes:
    """One raw row, CRLF-ended as the planted tables' (Python's csv writer) rows are."""
    return (",".join(values.get(h, "") for h in header) + "\r\n").encode()


@pytest.mark.parametrize("case", ["space-before-quote", "huge-offset", "bad-utf8-elsewhere"])
def test_what_duckdb_would_read_differently_goes_to_the_reference(planted, tmp_path, case):
    """Three inputs where DuckDB alone would not give the reference's answer: a space before
    an opening quote (DuckDB reads a quoted field, Python keeps the characters), an offset
    beyond a 64-bit integer, invalid UTF-8 in a column the text never uses. Each goes to the
    row-by-row reader: the same records, or the same error."""
    from common.data.eicu import _RowByRow, cohort_table

    stay = read(planted / "patient.csv.gz")[0]["patientunitstayid"]
    header = list(read(planted / "medication.csv.gz")[0].keys())
    line = {
        "space-before-quote": _medication_line(header, patientunitstayid=stay,
                                               drugstartoffset="5", drugname=' "ZZA, 81"'),
        "huge-offset": _medication_line(header, patientunitstayid=stay,
                                        drugstartoffset="-1e30", drugname="ZZHUGE"),
        "bad-utf8-elsewhere": _medication_line(header, patientunitstayid=stay,
                                               drugstartoffset="5", drugname="ZZOK",
                                               medicationid="1ZZBYTE"),
    }[case]
    if case == "bad-utf8-elsewhere":
        line = line.replace(b"1ZZBYTE", b"1\xff")  # not UTF-8
    import duckdb

    root = _with_medication_lines(planted, tmp_path / "e", [line])
    # The fast path does not complete: its own refusal, or DuckDB's UTF-8 check of the line.
    with pytest.raises(duckdb.Error if case == "bad-utf8-elsewhere" else _RowByRow):
        cohort_table(root, site="region", hours=24.0)
    if case == "bad-utf8-elsewhere":
        for engine in ("duckdb", "python"):
            with pytest.raises(FedmergeError, match=r"medication\.csv"):
                load_records(f"eicu:{root}?cache=off&engine={engine}")
        return
    fast = list(load_records(f"eicu:{root}?cache=off"))
    assert fast == list(load_records(f"eicu:{root}?engine=python"))
    text = " ".join(r.text for r in fast)
    assert ('"ZZA' in text) if case == "space-before-quote" else ("ZZHUGE" in text)


def test_an_infinite_offset_is_one_clear_error(planted, tmp_path):
    stay = read(planted / "patient.csv.gz")[0]["patientunitstayid"]
    header = list(read(planted / "medication.csv.gz")[0].keys())
    root = _with_medication_lines(planted, tmp_path / "e", [_medication_line(
        header, patientunitstayid=stay, drugstartoffset="inf", drugname="ZZINF")])
    with pytest.raises(FedmergeError, match=r"medication\.csv: line \d+, column "
                       r"'drugstartoffset': offset 'inf' is not a number of minutes"):
        load_records(f"eicu:{root}?cache=off")

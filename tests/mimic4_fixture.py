"""A tiny MIMIC-IV 2.2 export written with MIMIC-IV's own table and column names.

Seven ICU stays chosen to exercise every rule of the loaders: an adult who died inside the stay
(dod on the outtime date), a survivor, a child (excluded), a death earlier on the admission day
than intime (label 0 by the pipeline's rule), a patient whose anchor_age is 17 but who turns 18
by the stay year, an adult stay shorter than 48 hours, and a stay without an admissions row.
Events sit inside, before and after the 48-hour window.

`EXPECTED` holds, derived by hand from the healthylaife pipeline's rules (see
`common.data.mimic4`), what the pipeline's mortality cohort yields; `PREVIOUS` what the previous
row-by-row loader (`engine=python`) yields on the same files. Every difference between the two
is one of the pipeline's rules and has its own test in tests/test_data_mimic4.py.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

COLUMNS = {
    "hosp/patients": "subject_id gender anchor_age anchor_year anchor_year_group dod",
    "hosp/admissions": "subject_id hadm_id admittime dischtime deathtime admission_type "
    "admit_provider_id admission_location discharge_location insurance language "
    "marital_status race edregtime edouttime hospital_expire_flag",
    "hosp/diagnoses_icd": "subject_id hadm_id seq_num icd_code icd_version",
    "hosp/d_icd_diagnoses": "icd_code icd_version long_title",
    "icu/icustays": "subject_id hadm_id stay_id first_careunit last_careunit intime outtime los",
    "icu/d_items": "itemid label abbreviation linksto category unitname param_type "
    "lownormalvalue highnormalvalue",
    "icu/chartevents": "subject_id hadm_id stay_id caregiver_id charttime storetime itemid "
    "value valuenum valueuom warning",
    "icu/inputevents": "subject_id hadm_id stay_id caregiver_id starttime endtime storetime "
    "itemid amount amountuom rate rateuom orderid linkorderid ordercategoryname "
    "secondaryordercategoryname ordercomponenttypedescription ordercategorydescription "
    "patientweight totalamount totalamountuom isopenbag continueinnextdept statusdescription "
    "originalamount originalrate",
    "icu/procedureevents": "subject_id hadm_id stay_id caregiver_id starttime endtime storetime "
    "itemid value valueuom location locationcategory orderid linkorderid ordercategoryname "
    "ordercategorydescription patientweight isopenbag continueinnextdept statusdescription "
    "originalamount originalrate",
    "icu/outputevents": "subject_id hadm_id stay_id caregiver_id charttime storetime itemid "
    "value valueuom",
}

HR, TEMP, NOREPI, SALINE, VENT, FOLEY = "220045", "223761", "221906", "225158", "225792", "226559"

# (subject, hadm, stay)
S1, S2, S3, S4, S5, S6, S7 = (
    ("10001", "20001", "30001"),
    ("10002", "20002", "30002"),
    ("10003", "20003", "30003"),
    ("10004", "20004", "30004"),
    ("10005", "20005", "30005"),
    ("10006", "20006", "30006"),
    ("10007", "20007", "30007"),
)


def _ids(stay: tuple[str, str, str]) -> dict[str, str]:
    return dict(subject_id=stay[0], hadm_id=stay[1], stay_id=stay[2], caregiver_id="7")


def _chart(stay, time, item, number, unit) -> dict[str, str]:
    return dict(_ids(stay), charttime=time, storetime=time, itemid=item, value=number,
                valuenum=number, valueuom=unit, warning="0")  # fmt: skip


def _input(stay, start, end, item, amount, rate, order) -> dict[str, str]:
    return dict(_ids(stay), starttime=start, endtime=end, storetime=start, itemid=item,
                amount=amount, amountuom="mg", rate=rate, rateuom="mg/hour" if rate else "",
                orderid=order, linkorderid=order)  # fmt: skip


def _output(stay, time, item, value) -> dict[str, str]:
    return dict(_ids(stay), charttime=time, storetime=time, itemid=item, value=value,
                valueuom="mL")

ROWS: dict[str, list[dict[str, str]]] = {
    "hosp/patients": [
        dict(subject_id="10001", gender="F", anchor_age="70", anchor_year="2150", dod="2150-03-03"),
        dict(subject_id="10002", gender="M", anchor_age="45", anchor_year="2160", dod="2160-09-01"),
        dict(subject_id="10003", gender="M", anchor_age="16", anchor_year="2170", dod=""),
        dict(subject_id="10004", gender="F", anchor_age="80", anchor_year="2140", dod="2140-05-10"),
        dict(subject_id="10005", gender="M", anchor_age="17", anchor_year="2100", dod=""),
        dict(subject_id="10006", gender="F", anchor_age="60", anchor_year="2180", dod=""),
        dict(subject_id="10007", gender="M", anchor_age="50", anchor_year="2190", dod=""),
    ],
    "hosp/admissions": [
        dict(subject_id="10001", hadm_id="20001", race="WHITE", insurance="Medicare"),
        dict(subject_id="10002", hadm_id="20002", race="BLACK", insurance="Other"),
        dict(subject_id="10004", hadm_id="20004", race="ASIAN", insurance="Medicaid"),
        dict(subject_id="10005", hadm_id="20005", race="WHITE", insurance="Other"),
        dict(subject_id="10006", hadm_id="20006", race="WHITE", insurance="Other"),
        # 20007 has no admissions row: the pipeline's inner join drops stay 30007.
    ],
    "hosp/d_icd_diagnoses": [
        dict(icd_code="A419", icd_version="10", long_title="Sepsis, unspecified organism"),
        dict(icd_code="N179", icd_version="10", long_title="Acute kidney failure, unspecified"),
        dict(icd_code="4280", icd_version="9", long_title="Congestive heart failure, unspecified"),
        dict(icd_code="A410", icd_version="10",
             long_title="Sepsis due to Staphylococcus aureus"),
        # The three-character roots the pipeline groups ICD-10 codes to.
        dict(icd_code="A41", icd_version="10", long_title="Other sepsis"),
        dict(icd_code="N17", icd_version="10", long_title="Acute kidney failure"),
        dict(icd_code="I50", icd_version="10", long_title="Heart failure"),
    ],
    "hosp/diagnoses_icd": [
        dict(subject_id="10001", hadm_id="20001", seq_num="2", icd_code="N179", icd_version="10"),
        dict(subject_id="10001", hadm_id="20001", seq_num="1", icd_code="A419", icd_version="10"),
        dict(subject_id="10001", hadm_id="20001", seq_num="3", icd_code="A410", icd_version="10"),
        dict(subject_id="10002", hadm_id="20002", seq_num="1", icd_code="4280", icd_version="9"),
        dict(subject_id="10003", hadm_id="20003", seq_num="1", icd_code="A419", icd_version="10"),
    ],
    "icu/icustays": [
        dict(
            subject_id="10001",
            hadm_id="20001",
            stay_id="30001",
            intime="2150-03-01 10:00:00",
            outtime="2150-03-03 18:00:00",
        ),
        dict(
            subject_id="10002",
            hadm_id="20002",
            stay_id="30002",
            intime="2160-01-05 08:00:00",
            outtime="2160-01-07 08:00:00",
        ),
        dict(
            subject_id="10003",
            hadm_id="20003",
            stay_id="30003",
            intime="2170-02-01 08:00:00",
            outtime="2170-02-02 08:00:00",
        ),
        dict(
            subject_id="10004",
            hadm_id="20004",
            stay_id="30004",
            intime="2140-05-10 14:00:00",
            outtime="2140-05-12 14:00:00",
        ),
        dict(
            subject_id="10005",
            hadm_id="20005",
            stay_id="30005",
            intime="2101-02-01 00:00:00",
            outtime="2101-02-04 00:00:00",
        ),
        dict(  # 47 h 30 min: shorter than the 48-hour window
            subject_id="10006",
            hadm_id="20006",
            stay_id="30006",
            intime="2180-06-01 00:00:00",
            outtime="2180-06-02 23:30:00",
        ),
        dict(
            subject_id="10007",
            hadm_id="20007",
            stay_id="30007",
            intime="2190-01-01 00:00:00",
            outtime="2190-01-04 00:00:00",
        ),
    ],  # fmt: skip
    "icu/d_items": [
        dict(itemid=HR, label="Heart Rate"),
        dict(itemid=TEMP, label="Temperature Fahrenheit"),
        dict(itemid=NOREPI, label="Norepinephrine"),
        dict(itemid=SALINE, label="NaCl 0.9%"),
        dict(itemid=VENT, label="Invasive Ventilation"),
        dict(itemid=FOLEY, label="Foley"),
    ],
    "icu/chartevents": [
        # stay 30001 (intime 2150-03-01 10:00): heart rates at hours 1 and 47, one before
        # intime, one at hour 49, and 1000 at hour 5 (above the 98th percentile of all the
        # cohort's heart rates, so the pipeline removes it).
        _chart(S1, "2150-03-01 11:00:00", HR, "100", "bpm"),
        _chart(S1, "2150-03-03 09:00:00", HR, "110", "bpm"),
        _chart(S1, "2150-03-01 09:00:00", HR, "900", "bpm"),
        _chart(S1, "2150-03-03 11:00:00", HR, "500", "bpm"),
        _chart(S1, "2150-03-01 15:00:00", HR, "1000", "bpm"),
        # 99.1 is the largest temperature of the cohort: above its 98th percentile.
        _chart(S1, "2150-03-01 12:00:00", TEMP, "98.6", "°F"),
        _chart(S1, "2150-03-01 13:00:00", TEMP, "99.1", "°F"),
        dict(_chart(S1, "2150-03-01 13:00:00", HR, "", "bpm"), value="see note"),
        # stay 30002: heart rates in two 2-hour buckets (1 | 2, 2) and a mean to round.
        _chart(S2, "2160-01-05 09:00:00", HR, "1", "bpm"),
        _chart(S2, "2160-01-05 10:00:00", HR, "2", "bpm"),
        _chart(S2, "2160-01-05 11:00:00", HR, "2", "bpm"),
        _chart(S2, "2160-01-05 12:00:00", TEMP, "98.6", "°F"),
        _chart(S2, "2160-01-05 12:30:00", TEMP, "98.7", "°F"),
        _chart(S2, "2160-01-05 13:00:00", TEMP, "98.9", "°F"),
        # the child and a stay that is not in icustays: never read into a record.
        _chart(S3, "2170-02-01 09:00:00", HR, "70", "bpm"),
        _chart(("19999", "29999", "39999"), "2170-02-01 09:00:00", HR, "70", "bpm"),
        _chart(S6, "2180-06-01 01:00:00", HR, "80", "bpm"),
    ],
    "icu/inputevents": [
        _input(S1, "2150-03-01 11:00:00", "2150-03-01 12:30:00", NOREPI, "2", "1", "1"),
        _input(S1, "2150-03-01 15:00:00", "2150-03-01 17:00:00", NOREPI, "4", "2", "2"),
        # a bolus: no rate, so the pipeline's dropna removes it.
        _input(S1, "2150-03-01 12:00:00", "2150-03-01 12:01:00", NOREPI, "10", "", "3"),
        # starts and ends in the same whole hour: the pipeline's sanity check removes it.
        _input(S1, "2150-03-01 16:10:00", "2150-03-01 16:50:00", SALINE, "500", "5", "4"),
        _input(S1, "2150-03-03 22:00:00", "2150-03-04 02:00:00", SALINE, "1000", "5", "5"),
    ],
    "icu/procedureevents": [
        dict(subject_id="10001", hadm_id="20001", stay_id="30001",
             starttime="2150-03-01 12:00:00", itemid=VENT, value="60"),
    ],
    "icu/outputevents": [
        _output(S1, "2150-03-01 14:00:00", FOLEY, "300"),
        _output(S4, "2140-05-10 15:00:00", FOLEY, "200"),
    ],
}

S1_DIAGNOSES = "Other sepsis;Acute kidney failure"
S1_NUMERIC = (
    "The chart events mesured are :105 for Heart Rate;98.6 for Temperature Fahrenheit. "
    "The mean amounts of medications administered during the episode are :3 of Norepinephrine."
)
S2_CHART = "The chart events mesured are :1.5 for Heart Rate;98.733 for Temperature Fahrenheit."
EXPECTED = {
    "30001": (
        1,
        f"The patient is diagnosed with {S1_DIAGNOSES}. {S1_NUMERIC} "
        "The procedures performed are :Invasive Ventilation. The outputs collected are :Foley.",
    ),
    "30002": (
        0, f"The patient is diagnosed with Congestive heart failure, unspecified. {S2_CHART}"
    ),
    "30004": (0, "The outputs collected are :Foley."),
}
PREVIOUS = {
    "30001": (
        1,
        "The patient is diagnosed with Sepsis, unspecified organism;"
        "Acute kidney failure, unspecified;Sepsis due to Staphylococcus aureus. "
        "The chart events mesured are :403.333 for Heart Rate;98.85 for Temperature Fahrenheit. "
        "The mean amounts of medications administered during the episode are :"
        "5.333 of Norepinephrine;500 of NaCl 0.9%. "
        "The procedures performed are :Invasive Ventilation. The outputs collected are :Foley.",
    ),
    "30002": (
        0,
        "The patient is diagnosed with Congestive heart failure, unspecified. "
        "The chart events mesured are :1.667 for Heart Rate;98.733 for Temperature Fahrenheit.",
    ),
    "30004": (0, "The outputs collected are :Foley."),
    "30005": (0, ""),
    "30006": (0, "The chart events mesured are :80 for Heart Rate."),
    "30007": (0, ""),
}
# The pipeline's ICD-9 → ICD-10 table format (tab-separated, first row per code wins).
ICD_MAP = "diagnosis_code\ticd9cm\ticd10cm\tdiagnosis_description\n428\t428\tI509\theart failure\n"


def write_table(path: Path, columns: list[str], rows: list[dict[str, str]]) -> Path:
    """Write rows (missing fields blank) under the given header; `.gz` paths are gzipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns])
    return path


def write_mimic4(root: Path, *, gzipped: tuple[str, ...] = ("icu/chartevents",)) -> Path:
    """Write every table under `root` (those in `gzipped` as .csv.gz) and return `root`."""
    for table, header in COLUMNS.items():
        suffix = ".csv.gz" if table in gzipped else ".csv"
        write_table(root / f"{table}{suffix}", header.split(), ROWS.get(table, []))
    return root

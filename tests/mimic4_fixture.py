"""A tiny MIMIC-IV 2.2 export written with MIMIC-IV's own table and column names.

Five ICU stays chosen to exercise every rule of the loader: an adult who died inside the stay
(dod on the outtime date), a survivor, a child (excluded), a death earlier on the admission day
than intime (label 0 by the pipeline's rule), and a patient who turns 18 by the stay year.
Events sit inside, before and after the 48-hour window. `EXPECTED` holds the texts by hand.
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
S1, S2, S3, S4, S5 = (
    ("10001", "20001", "30001"),
    ("10002", "20002", "30002"),
    ("10003", "20003", "30003"),
    ("10004", "20004", "30004"),
    ("10005", "20005", "30005"),
)

ROWS: dict[str, list[dict[str, str]]] = {
    "hosp/patients": [
        dict(subject_id="10001", gender="F", anchor_age="70", anchor_year="2150", dod="2150-03-03"),
        dict(subject_id="10002", gender="M", anchor_age="45", anchor_year="2160", dod="2160-09-01"),
        dict(subject_id="10003", gender="M", anchor_age="16", anchor_year="2170", dod=""),
        dict(subject_id="10004", gender="F", anchor_age="80", anchor_year="2140", dod="2140-05-10"),
        dict(subject_id="10005", gender="M", anchor_age="17", anchor_year="2100", dod=""),
    ],
    "hosp/admissions": [
        dict(subject_id="10001", hadm_id="20001", race="WHITE", insurance="Medicare"),
        dict(subject_id="10002", hadm_id="20002", race="BLACK", insurance="Other"),
        dict(subject_id="10004", hadm_id="20004", race="ASIAN", insurance="Medicaid"),
        dict(subject_id="10005", hadm_id="20005", race="WHITE", insurance="Other"),
    ],
    "hosp/d_icd_diagnoses": [
        dict(icd_code="A419", icd_version="10", long_title="Sepsis, unspecified organism"),
        dict(icd_code="N179", icd_version="10", long_title="Acute kidney failure, unspecified"),
        dict(icd_code="4280", icd_version="9", long_title="Congestive heart failure, unspecified"),
    ],
    "hosp/diagnoses_icd": [
        dict(subject_id="10001", hadm_id="20001", seq_num="2", icd_code="N179", icd_version="10"),
        dict(subject_id="10001", hadm_id="20001", seq_num="1", icd_code="A419", icd_version="10"),
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
            outtime="2160-01-06 08:00:00",
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
            outtime="2140-05-12 09:00:00",
        ),
        dict(
            subject_id="10005",
            hadm_id="20005",
            stay_id="30005",
            intime="2101-02-01 00:00:00",
            outtime="2101-02-02 00:00:00",
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
        # stay 30001 (intime 2150-03-01 10:00): two heart rates inside, one before, one after.
        dict(stay_id="30001", charttime="2150-03-01 11:00:00", itemid=HR, valuenum="100"),
        dict(stay_id="30001", charttime="2150-03-03 09:00:00", itemid=HR, valuenum="110"),
        dict(stay_id="30001", charttime="2150-03-01 09:00:00", itemid=HR, valuenum="900"),
        dict(stay_id="30001", charttime="2150-03-03 11:00:00", itemid=HR, valuenum="500"),
        dict(stay_id="30001", charttime="2150-03-01 12:00:00", itemid=TEMP, valuenum="98.6"),
        dict(stay_id="30001", charttime="2150-03-01 13:00:00", itemid=TEMP, valuenum="99.1"),
        dict(stay_id="30001", charttime="2150-03-01 13:00:00", itemid=HR, value="see note"),
        # stay 30002: a mean that needs rounding to three decimals.
        dict(stay_id="30002", charttime="2160-01-05 09:00:00", itemid=HR, valuenum="1"),
        dict(stay_id="30002", charttime="2160-01-05 10:00:00", itemid=HR, valuenum="2"),
        dict(stay_id="30002", charttime="2160-01-05 11:00:00", itemid=HR, valuenum="2"),
        # the child and a stay that is not in icustays: never read into a record.
        dict(stay_id="30003", charttime="2170-02-01 09:00:00", itemid=HR, valuenum="70"),
        dict(stay_id="39999", charttime="2170-02-01 09:00:00", itemid=HR, valuenum="70"),
    ],
    "icu/inputevents": [
        dict(stay_id="30001", starttime="2150-03-01 11:00:00", itemid=NOREPI, amount="2"),
        dict(stay_id="30001", starttime="2150-03-01 15:00:00", itemid=NOREPI, amount="4"),
        dict(stay_id="30001", starttime="2150-03-03 22:00:00", itemid=SALINE, amount="1000"),
    ],
    "icu/procedureevents": [
        dict(stay_id="30001", starttime="2150-03-01 12:00:00", itemid=VENT, value="60"),
    ],
    "icu/outputevents": [
        dict(stay_id="30001", charttime="2150-03-01 14:00:00", itemid=FOLEY, value="300"),
        dict(stay_id="30004", charttime="2140-05-10 15:00:00", itemid=FOLEY, value="200"),
    ],
}

S1_DIAGNOSES = "Sepsis, unspecified organism;Acute kidney failure, unspecified"
S1_NUMERIC = (
    "The chart events mesured are :105 for Heart Rate;98.85 for Temperature Fahrenheit. "
    "The mean amounts of medications administered during the episode are :3 of Norepinephrine."
)
EXPECTED = {
    "30001": (
        1,
        f"The patient is diagnosed with {S1_DIAGNOSES}. {S1_NUMERIC} "
        "The procedures performed are :Invasive Ventilation. The outputs collected are :Foley.",
    ),
    "30002": (
        0,
        "The patient is diagnosed with Congestive heart failure, unspecified. "
        "The chart events mesured are :1.667 for Heart Rate.",
    ),
    "30004": (0, "The outputs collected are :Foley."),
    "30005": (0, ""),
}


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

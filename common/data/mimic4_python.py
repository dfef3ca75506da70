"""The previous, pure-Python MIMIC-IV loader, kept as the reference the new one is measured by.

`bench/mimic_load.py` times it against `common.data.mimic4` on the same export, and the tests
compare both on the hand-built fixture: every difference must be one of the pipeline's rules
that this reference does not apply (see `common.data.mimic4`). Reachable as
`mimic4:DIR?engine=python`. It streams every table row by row with the stdlib `csv` module and
keeps only per-item running sums, so its memory is small but it reads about 90k rows a second.

What it does (unchanged from before the query engine): adult ICU stays by
`anchor_age + (year of intime - anchor_year) >= 18`, every stay whatever its length, the plain
mean of each item over [intime, intime + hours), diagnoses by their own long titles, no outlier
removal, no unit filtering, every medication row with an amount.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from common.data.tables import find_table, read_columns
from common.errors import FedmergeError
from common.records import PatientRecord, Section

ADULT_AGE = 18
GENDERS = {"M": "male", "F": "female"}


class _Stay(NamedTuple):
    """Internal only (never crosses a module boundary): a tuple keeps the hot loop cheap."""

    stay_id: str
    hadm_id: str
    intime: datetime
    end: datetime
    label: int
    age: int
    gender: str
    start_text: str
    end_text: str


def _number(raw: str, where: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise FedmergeError(f"{where}: '{raw}' is not a number") from None


def _time(raw: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(raw.strip())
    except ValueError:
        raise FedmergeError(f"{where}: '{raw}' is not a timestamp (YYYY-MM-DD HH:MM:SS)") from None


def format_mean(value: float) -> str:
    """Three decimals at most, trailing zeros dropped: the pipeline's rounding of the means."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _second_text(moment: datetime) -> str:
    """`moment` rounded up to a whole second, as MIMIC writes timestamps: for a timestamp t in
    whole seconds, t >= moment exactly when its text >= this text, so windows compare as text."""
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.isoformat(sep=" ", timespec="seconds")


def _patients(hosp: Path) -> tuple[Path, dict[str, tuple[str, int, int, str]]]:
    path = find_table(hosp, "patients")
    patients = {}
    for line, (subject, gender, age, year, dod) in read_columns(
        path, ("subject_id", "gender", "anchor_age", "anchor_year", "dod")
    ):
        where = f"{path}: line {line}"
        patients[subject.strip()] = (
            gender.strip(),
            int(_number(age, f"{where}, column 'anchor_age'")),
            int(_number(year, f"{where}, column 'anchor_year'")),
            dod.strip(),
        )
    return path, patients


def _cohort(directory: Path, hours: float) -> tuple[dict[str, _Stay], Path]:
    """Adult ICU stays with their window end and label."""
    patients_path, patients = _patients(directory / "hosp")
    path = find_table(directory / "icu", "icustays")
    stays: dict[str, _Stay] = {}
    first_line: dict[str, int] = {}
    for line, (subject, hadm, stay, intime_raw, outtime_raw) in read_columns(
        path, ("subject_id", "hadm_id", "stay_id", "intime", "outtime")
    ):
        where = f"{path}: line {line}"
        stay = stay.strip()
        if not stay:
            raise FedmergeError(f"{where}: column 'stay_id' is blank")
        if stay in first_line:
            raise FedmergeError(
                f"{where}: duplicate stay_id '{stay}' (first at line {first_line[stay]})"
            )
        first_line[stay] = line
        subject = subject.strip()
        if subject not in patients:
            raise FedmergeError(f"{where}: subject_id '{subject}' has no row in hosp/patients")
        gender, anchor_age, anchor_year, dod = patients[subject]
        intime = _time(intime_raw, f"{where}, column 'intime'")
        outtime = _time(outtime_raw, f"{where}, column 'outtime'")
        age = anchor_age + intime.year - anchor_year
        if age < ADULT_AGE:
            continue
        died = False
        if dod:
            death = _time(dod[:10], f"{patients_path}: subject {subject}, column 'dod'")
            died = intime <= death <= outtime
        end = intime + timedelta(hours=hours)
        stays[stay] = _Stay(
            stay_id=stay, hadm_id=hadm.strip(), intime=intime, end=end, label=int(died),
            age=age, gender=gender, start_text=_second_text(intime), end_text=_second_text(end),
        )  # fmt: skip
    if not stays:
        raise FedmergeError(f"{path}: no adult ICU stay (expected at least one with age >= 18)")
    return stays, path


def _item_labels(icu: Path) -> dict[str, str]:
    path = find_table(icu, "d_items")
    return {item.strip(): " ".join(label.split()) for _, (item, label) in
            read_columns(path, ("itemid", "label"))}  # fmt: skip


def _events(
    icu: Path,
    table: str,
    time_column: str,
    value_column: str | None,
    stays: dict[str, _Stay],
    labels: dict[str, str],
) -> dict[str, dict[str, list[float]]]:
    """Per stay, per item label: [sum, count] of values (or of occurrences) inside the window."""
    path = find_table(icu, table)
    columns = ("stay_id", time_column, "itemid") + ((value_column,) if value_column else ())
    sums: dict[str, dict[str, list[float]]] = defaultdict(dict)
    parse_time = datetime.fromisoformat
    # The hot loop of the whole loader (hundreds of millions of rows in real MIMIC-IV): no
    # per-row string formatting or function calls beyond what filtering needs; error
    # messages are built only when a row is actually bad.
    for line, values in read_columns(path, columns):
        stay = stays.get(values[0]) or stays.get(values[0].strip())
        if stay is None:
            continue
        when = values[1]
        if len(when) == 19 and when[10] == " ":
            # MIMIC's own "YYYY-MM-DD HH:MM:SS" orders as text: compare without parsing.
            if when < stay.start_text or when >= stay.end_text:
                continue
        else:
            try:
                moment = parse_time(when)
            except ValueError:
                moment = _time(when, f"{path}: line {line}, column '{time_column}'")
            if moment < stay.intime or moment >= stay.end:
                continue
        value = 1.0
        if value_column:
            raw = values[3]
            if not raw or raw.isspace():
                continue  # text-only chart values carry no number to average
            try:
                value = float(raw)
            except ValueError:
                raise FedmergeError(
                    f"{path}: line {line}, column '{value_column}': '{raw}' is not a number"
                ) from None
        itemid = values[2]
        per_stay = sums[stay.stay_id]
        acc = per_stay.get(itemid)
        if acc is None:
            itemid = itemid.strip()
            if itemid not in labels:
                raise FedmergeError(
                    f"{path}: line {line}: itemid '{itemid}' has no row in icu/d_items"
                )
            acc = per_stay.setdefault(itemid, [0.0, 0])
        acc[0] += value
        acc[1] += 1
    return sums


def _diagnoses(hosp: Path, hadm_ids: set[str]) -> dict[str, list[str]]:
    path = find_table(hosp, "d_icd_diagnoses")
    titles = {
        (code.strip(), version.strip()): " ".join(title.split())
        for _, (code, version, title) in read_columns(
            path, ("icd_code", "icd_version", "long_title")
        )
    }
    path = find_table(hosp, "diagnoses_icd")
    found: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for line, (hadm, seq, code, version) in read_columns(
        path, ("hadm_id", "seq_num", "icd_code", "icd_version")
    ):
        hadm = hadm.strip()
        if hadm not in hadm_ids:
            continue
        key = (code.strip(), version.strip())
        title = titles.get(key, f"ICD-{key[1]} {key[0]}")
        found[hadm].append((_number(seq, f"{path}: line {line}, column 'seq_num'"), title))
    return {hadm: list(dict.fromkeys(t for _, t in sorted(rows))) for hadm, rows in found.items()}


def _admissions(hosp: Path, hadm_ids: set[str]) -> dict[str, tuple[str, str]]:
    path = find_table(hosp, "admissions")
    return {
        hadm.strip(): (" ".join(race.split()), " ".join(insurance.split()))
        for _, (hadm, race, insurance) in read_columns(path, ("hadm_id", "race", "insurance"))
        if hadm.strip() in hadm_ids
    }


def _items(per_item: dict[str, list[float]], labels: dict[str, str], fmt: str) -> list[str]:
    ordered = sorted(per_item.items(), key=lambda kv: (len(kv[0]), kv[0]))
    return [fmt.format(mean=format_mean(s / n), label=labels[i]) for i, (s, n) in ordered]


def load_mimic4_python(
    directory: Path, *, hours: float = 48.0, demographics: bool = False, site: str | None = None
) -> list[PatientRecord]:
    """Records of every adult ICU stay in a MIMIC-IV 2.2 export (`hosp/`, `icu/` CSV tables)."""
    if not directory.is_dir():
        raise FedmergeError(f"{directory}: MIMIC-IV directory not found")
    hosp, icu = directory / "hosp", directory / "icu"
    stays, _ = _cohort(directory, hours)
    hadm_ids = {s.hadm_id for s in stays.values()}
    labels = _item_labels(icu)
    diagnoses = _diagnoses(hosp, hadm_ids)
    admissions = _admissions(hosp, hadm_ids) if demographics else {}
    chart = _events(icu, "chartevents", "charttime", "valuenum", stays, labels)
    inputs = _events(icu, "inputevents", "starttime", "amount", stays, labels)
    procedures = _events(icu, "procedureevents", "starttime", None, stays, labels)
    outputs = _events(icu, "outputevents", "charttime", None, stays, labels)

    records = []
    for stay in stays.values():
        sections: list[Section] = []
        titles = diagnoses.get(stay.hadm_id, [])
        if demographics:
            race, insurance = admissions.get(stay.hadm_id, ("", ""))
            who = " ".join(w for w in (race, GENDERS.get(stay.gender, stay.gender)) if w)
            head = f"The patient {who}, {stay.age} years old, covered by {insurance}"
            text = f"{head} was diagnosed with {';'.join(titles)}." if titles else f"{head}."
            sections.append(Section(name="diagnoses", text=text))
        elif titles:
            sections.append(
                Section(name="diagnoses", text=f"The patient is diagnosed with {';'.join(titles)}.")
            )
        for name, table, header, fmt, numeric in (
            ("chart_events", chart, "The chart events mesured are :", "{mean} for {label}", True),
            (
                "medications", inputs,
                "The mean amounts of medications administered during the episode are :",
                "{mean} of {label}", True,
            ),
            ("procedures", procedures, "The procedures performed are :", "{label}", False),
            ("outputs", outputs, "The outputs collected are :", "{label}", False),
        ):  # fmt: skip
            items = _items(table.get(stay.stay_id, {}), labels, fmt)
            if items:
                sections.append(
                    Section(name=name, text=f"{header}{';'.join(items)}.", numeric=numeric)
                )
        records.append(
            PatientRecord(
                stay_id=stay.stay_id,
                site_id=site,
                label=stay.label,
                text=" ".join(s.text for s in sections),
                sections=tuple(sections),
            )
        )
    return records

"""eICU Collaborative Research Database tables → one record per labelled ICU unit stay: the
rules, and the row-by-row reader that applies them (`eicu:DIR?engine=python`).

This module is the reference: `common.data.eicu` reads the big tables with DuckDB but passes
every value through the functions here and must give the same records; where DuckDB's path
meets anything it cannot vouch for, it runs this reader, whose errors name the line.

The label is hospital mortality (`patient.hospitaldischargestatus == "Expired"`); stays with a
blank status are dropped. The text is what a clinician knows by the end of the observation
window (24 h of the unit stay by default, `eicu:DIR?hours=N`): demographics at admission, the
admission diagnosis, the worst APACHE physiology of the first 24 h with units, and the
diagnoses, medications and treatments recorded before the window ends (rows from before unit
admission, e.g. emergency-department orders, are history and kept). Nothing else is read: no
discharge, outcome or prediction column is ever loaded, so none can reach the text.

The site is the hospital's region (blank region → "Unknown") or, with `?site=hospital`, the
hospital id: the natural federated split of the multi-centre database.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from common.data.tables import find_table, read_columns
from common.errors import FedmergeError
from common.records import PatientRecord, Section

LABELS = {"Expired": 1, "Alive": 0}

# apacheApsVar columns rendered, with a readable name and the unit eICU records them in.
PHYSIOLOGY: tuple[tuple[str, str, str], ...] = (
    ("heartrate", "heart rate", "bpm"),
    ("meanbp", "mean blood pressure", "mmHg"),
    ("temperature", "temperature", "Celsius"),
    ("respiratoryrate", "respiratory rate", "breaths per minute"),
    ("pao2", "PaO2", "mmHg"),
    ("pco2", "PaCO2", "mmHg"),
    ("fio2", "FiO2", "%"),
    ("ph", "pH", ""),
    ("hematocrit", "hematocrit", "%"),
    ("wbc", "white blood cells", "K/uL"),
    ("sodium", "sodium", "mEq/L"),
    ("creatinine", "creatinine", "mg/dL"),
    ("bun", "blood urea nitrogen", "mg/dL"),
    ("glucose", "glucose", "mg/dL"),
    ("albumin", "albumin", "g/dL"),
    ("bilirubin", "bilirubin", "mg/dL"),
    ("urine", "urine output", "mL/day"),
    ("eyes", "GCS eyes", "points"),
    ("motor", "GCS motor", "points"),
    ("verbal", "GCS verbal", "points"),
)
# 0/1 flags of the same table, rendered only when set.
FLAGS: tuple[tuple[str, str], ...] = (
    ("intubated", "intubated"),
    ("vent", "on mechanical ventilation"),
    ("dialysis", "on dialysis"),
    ("meds", "GCS not assessable because of sedation"),
)
# admissionDx branches whose leaf name is the diagnosis itself.
DIAGNOSIS_BRANCHES = {
    "All Diagnosis": "{name}",
    "Non-operative Organ Systems": "{name} (non-operative)",
    "Operative Organ Systems": "{name} (operative)",
}
APACHE_HOURS = 24.0


def format_number(raw: str, where: str) -> str:
    """A compact decimal ("46.50" → "46.5", "88.0" → "88"); refuses what is not a number."""
    try:
        value = float(raw)
    except ValueError:
        raise FedmergeError(f"{where}: '{raw}' is not a number") from None
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _offset(raw: str, where: str) -> int | None:
    if not raw.strip():
        return None
    try:
        return int(float(raw))
    except (ValueError, OverflowError):  # not a number, or infinite
        raise FedmergeError(f"{where}: offset '{raw}' is not a number of minutes") from None


def _sentence(header: str, items: list[str]) -> str:
    return f"{header} {' ; '.join(items)} ."


class _Timeline:
    """Items per stay, kept only when recorded before the window ends, ordered by offset."""

    def __init__(self, stays: set[str], end_minutes: float) -> None:
        self.stays = stays
        self.end = end_minutes
        self.items: dict[str, list[tuple[int, int, str]]] = defaultdict(list)

    def add(self, stay: str, offset: int | None, line: int, item: str) -> None:
        # `offset < end`: the window is [admission, admission + hours); a row without an offset
        # cannot be placed in time, so it is dropped rather than risk leaking a later event.
        if stay in self.stays and offset is not None and offset < self.end and item:
            self.items[stay].append((offset, line, item))

    def ordered(self, stay: str) -> list[str]:
        seen: dict[str, None] = {}
        for _, _, item in sorted(self.items.get(stay, ())):
            seen.setdefault(item, None)
        return list(seen)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _patients(directory: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    path = find_table(directory, "patient")
    columns = (
        "patientunitstayid", "hospitalid", "gender", "age", "ethnicity", "apacheadmissiondx",
        "admissionweight", "admissionheight", "hospitaldischargestatus",
    )  # fmt: skip
    stays: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for line, values in read_columns(path, columns):
        row = dict(zip(columns, values, strict=True))
        stay = row["patientunitstayid"].strip()
        where = f"{path}: line {line}"
        if not stay:
            raise FedmergeError(f"{where}: column 'patientunitstayid' is blank")
        if stay in first_line:
            raise FedmergeError(
                f"{where}: duplicate patientunitstayid '{stay}' (first at line {first_line[stay]})"
            )
        first_line[stay] = line
        status = row["hospitaldischargestatus"].strip()
        if not status:
            continue  # unknown outcome: not a labelled stay
        if status not in LABELS:
            raise FedmergeError(
                f"{where}: column 'hospitaldischargestatus' is '{status}', "
                "expected Expired, Alive or blank"
            )
        # The label leaves the row here; only the columns the text uses stay with it.
        row["label"] = str(LABELS[status])
        del row["hospitaldischargestatus"]
        stays[stay] = row
    if not stays:
        raise FedmergeError(f"{path}: no stay with a hospitaldischargestatus (no labelled records)")
    return path, stays


def _sites(directory: Path, stays: dict[str, dict[str, str]], by: str) -> dict[str, str]:
    if by == "hospital":
        return {stay: row["hospitalid"].strip() or "Unknown" for stay, row in stays.items()}
    path = find_table(directory, "hospital")
    region = {
        hospital.strip(): name.strip() or "Unknown"
        for _, (hospital, name) in read_columns(path, ("hospitalid", "region"))
    }
    sites = {}
    for stay, row in stays.items():
        hospital = row["hospitalid"].strip()
        if hospital not in region:
            raise FedmergeError(
                f"{path}: no row for hospitalid '{hospital}' (used by stay {stay} in patient table)"
            )
        sites[stay] = region[hospital]
    return sites


def _demographics(row: dict[str, str], where: str) -> str | None:
    parts = []
    age = row["age"].strip()
    if age:
        parts.append("older than 89 years" if age.startswith(">") else f"{age} years old")
    for key in ("gender", "ethnicity"):
        if row[key].strip():
            parts.append(_clean(row[key]).lower() if key == "gender" else _clean(row[key]))
    for key, name, unit in (
        ("admissionweight", "admission weight", "kg"),
        ("admissionheight", "admission height", "cm"),
    ):
        if row[key].strip():
            parts.append(f"{name} {format_number(row[key], f'{where}, column {key!r}')} {unit}")
    return f"The patient is {' , '.join(parts)} ." if parts else None


PHYSIOLOGY_HEADER = "The worst APACHE physiology of the first 24 hours is :"
PHYSIOLOGY_COLUMNS = ("patientunitstayid", *(c for c, _, _ in PHYSIOLOGY), *(c for c, _ in FLAGS))
_UNITS = {column: (name, unit) for column, name, unit in PHYSIOLOGY}
_FLAG_NAMES = dict(FLAGS)


def physiology_item(column: str, raw: str, where: str) -> str | None:
    """One apacheApsVar value as the text shows it (None: not shown): a measured value with
    its unit, or a flag's name when it is set; `where` names the place for a bad number."""
    if column in _FLAG_NAMES:
        return _FLAG_NAMES[column] if raw.strip() == "1" else None
    raw = raw.strip()
    if not raw:
        return None
    value = format_number(raw, where)
    if value == "-1":  # eICU's marker for "not measured"
        return None
    name, unit = _UNITS[column]
    return f"{name} {value} {unit}".rstrip()


def _physiology(directory: Path, stays: set[str]) -> dict[str, str]:
    path = find_table(directory, "apacheApsVar")
    texts: dict[str, str] = {}
    for line, values in read_columns(path, PHYSIOLOGY_COLUMNS):
        stay = values[0].strip()
        if stay not in stays:
            continue
        items = [item for column, raw in zip(PHYSIOLOGY_COLUMNS[1:], values[1:], strict=True)
                 if (item := physiology_item(column, raw, f"{path}: line {line}, column "
                                                          f"'{column}'")) is not None]
        if items:
            texts[stay] = _sentence(PHYSIOLOGY_HEADER, items)
    return texts


def _admission_item(path_text: str, name: str) -> str:
    parts = [_clean(p) for p in path_text.split("|")]
    name = _clean(name)
    branch = parts[1] if len(parts) > 1 else ""
    if branch in DIAGNOSIS_BRANCHES:
        return DIAGNOSIS_BRANCHES[branch].format(name=name)
    question = parts[-2] if len(parts) > 2 else ""
    return name if not question or question == name else f"{question} {name}"


def _read_timeline(
    directory: Path, table: str, columns: tuple[str, ...], timeline: _Timeline, render
) -> None:
    path = find_table(directory, table)
    for line, values in read_columns(path, columns):
        stay = values[0].strip()
        if stay not in timeline.stays:
            continue
        where = f"{path}: line {line}, column '{columns[1]}'"
        item = render(values)
        if item:
            timeline.add(stay, _offset(values[1], where), line, item)


TABLES = ("patient", "hospital", "apacheApsVar", "admissionDx", "diagnosis", "medication",
          "treatment")  # fmt: skip


def _last_part(values: tuple[str, ...]) -> str:
    return _clean(values[2].split("|")[-1])


# Each timeline: its table, the columns read (stay, offset, then what the item is made of) and
# the item of a row's values ("" or None: no item). Both readers use these.
TIMELINES: dict[str, tuple[str, tuple[str, ...], Callable[[tuple[str, ...]], str]]] = {
    "admission": ("admissionDx",
                  ("patientunitstayid", "admitdxenteredoffset", "admitdxpath", "admitdxname"),
                  lambda v: _admission_item(v[2], v[3])),
    "diagnoses": ("diagnosis", ("patientunitstayid", "diagnosisoffset", "diagnosisstring"),
                  _last_part),
    "medications": ("medication",
                    ("patientunitstayid", "drugstartoffset", "drugname", "drugordercancelled"),
                    lambda v: "" if v[3].strip() == "Yes" else _clean(v[2])),
    "treatments": ("treatment", ("patientunitstayid", "treatmentoffset", "treatmentstring"),
                   _last_part),
}  # fmt: skip


def load_eicu_python(directory: Path, *, site: str, hours: float) -> list[PatientRecord]:
    """Every labelled stay, every table read row by row with the stdlib `csv` module."""
    patient_path, stays = _patients(directory)
    ids = set(stays)
    sites = _sites(directory, stays, site)
    end = hours * 60.0
    # APACHE day-1 values summarise the first 24 h: with a shorter window they would look ahead.
    physiology = _physiology(directory, ids) if hours >= APACHE_HOURS else {}

    timelines = {}
    for name, (table, columns, render) in TIMELINES.items():
        timelines[name] = _Timeline(ids, end)
        _read_timeline(directory, table, columns, timelines[name], render)

    sentences = {
        name: {stay: _sentence(header, timelines[name].ordered(stay))
               for stay in timelines[name].items}
        for name, header, _ in SENTENCES
    }
    admission = timelines["admission"]
    admitted = {stay: admission.ordered(stay) for stay in admission.items}
    return [
        PatientRecord(
            stay_id=stay,
            site_id=sites[stay],
            label=int(stays[stay]["label"]),
            text=" ".join(text for _, text, _ in sections),
            sections=tuple(Section(name=n, text=t, numeric=k) for n, t, k in sections),
        )
        for stay, sections in stay_sections(patient_path, stays, physiology, admitted, sentences)
    ]


# The item sections after the physiology: (name, sentence header, numeric).
SENTENCES = (
    ("diagnoses", "The patient is diagnosed with", False),
    ("medications", "The medications started are :", True),
    ("treatments", "The treatments performed are :", False),
)


def stay_sections(
    patient_path: Path,
    stays: dict[str, dict[str, str]],
    physiology: dict[str, str],
    admission: dict[str, list[str]],
    sentences: dict[str, dict[str, str]],
) -> Iterator[tuple[str, list[tuple[str, str, bool]]]]:
    """Each stay's sections as (name, text, numeric), in the record's order: from its patient
    row, its admission items (in order, each once), its physiology sentence and its item
    sentences per `SENTENCES` name (stay → sentence; a stay without items has none)."""
    for stay, row in stays.items():
        sections: list[tuple[str, str, bool]] = []
        demographics = _demographics(row, f"{patient_path}: stay {stay}")
        if demographics:
            sections.append(("demographics", demographics, False))
        admit = [_clean(row["apacheadmissiondx"])] if row["apacheadmissiondx"].strip() else []
        admit += [i for i in admission.get(stay, ()) if i not in admit]
        if admit:
            sections.append(("admission", _sentence("The admission diagnosis is :", admit), False))
        if stay in physiology:
            sections.append(("physiology", physiology[stay], True))
        for name, _, numeric in SENTENCES:
            text = sentences[name].get(stay)
            if text:
                sections.append((name, text, numeric))
        yield stay, sections

"""The ICD-9 → ICD-10 table the MIMIC-IV pipeline converts diagnoses with, read from a user file.

The healthylaife pipeline ships `utils/mappings/ICD9_to_ICD10_mapping.txt` and applies it in
`utils/icu_preprocess_util.py` (`preproc_icd_module` → `standardize_icd(..., root=True)`):
an ICD-9 code is cut to its first three characters, looked up in the file's `diagnosis_code`
column, and the `icd10cm` of the first matching row replaces it; a code with no match is
dropped (its `dropna` in `preprocess_features_icu`). Then every code, converted or native
ICD-10, is cut to its three-character root ("Convert ICD-9 to ICD-10 and group ICD-10 codes").

fedmerge cannot ship that file (it is not ours to redistribute), so the user points at it:
`mimic4:DIR?icd_map=PATH`. Format (the pipeline's own): tab-separated text, a header row with
at least the columns `diagnosis_code` (ICD-9, without dot) and `icd10cm` (ICD-10-CM, without
dot); other columns are ignored; when a code appears more than once the first row wins.
"""

from __future__ import annotations

import csv
from pathlib import Path

from common.data.tables import open_text
from common.errors import FedmergeError

REQUIRED = ("diagnosis_code", "icd10cm")


def read_icd_map(path: Path) -> dict[str, str]:
    """ICD-9 three-character root → ICD-10-CM code, first row winning."""
    if not path.is_file():
        raise FedmergeError(f"{path}: ICD-9 → ICD-10 mapping file not found (icd_map=)")
    mapping: dict[str, str] = {}
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter="\t")
        try:
            names = [n.strip() for n in next(reader)]
        except StopIteration:
            raise FedmergeError(f"{path}: file is empty (expected a header row)") from None
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise FedmergeError(
                f"{path}: missing column '{missing[0]}' (expected a tab-separated header with "
                f"{', '.join(REQUIRED)})"
            )
        code_at, icd10_at = names.index("diagnosis_code"), names.index("icd10cm")
        for row in reader:
            if len(row) <= max(code_at, icd10_at):
                if not any(field.strip() for field in row):
                    continue
                raise FedmergeError(
                    f"{path}: line {reader.line_num} has {len(row)} fields, expected {len(names)}"
                )
            code, icd10 = row[code_at].strip(), row[icd10_at].strip()
            if code and icd10:
                mapping.setdefault(code, icd10)
    if not mapping:
        raise FedmergeError(f"{path}: no mapping rows (expected diagnosis_code → icd10cm pairs)")
    return mapping

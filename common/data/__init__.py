"""Patient data loaders, chosen by a data spec string.

`load_records("eicu:/data/eicu?site=hospital")` and friends turn a hospital's data into the
`PatientRecord`s every other module consumes, whatever the source format. Specs:
`jsonl:PATH`, `csv:PATH`,
`mimic4:DIR[?hours=48&bucket=2&pred_window=0&outlier=98&outlier_low=0&icd_map=PATH`
`&demographics=1&site=NAME&cache=DIR|off&engine=duckdb|python]`,
`eicu:DIR[?site=region|hospital&hours=24&cache=DIR|off&select=NAME&engine=duckdb|python]`
(`select` keeps one region or hospital),
`meds:DIR[?labels=TASK&site=NAME&hours=48&cache=DIR|off]` (Medical Event Data Standard),
`synthetic:ARGS` (the built-in synthetic cohort; `site=I` keeps one hospital).
"""

from __future__ import annotations

from collections.abc import Sequence

from common.data.spec import DataSpec, parse_spec
from common.errors import FedmergeError
from common.records import PatientRecord

__all__ = ["DataSpec", "load_records", "parse_spec"]


def _synthetic(args: str) -> list[PatientRecord]:
    from common.data.synthetic import load_synthetic

    return list(load_synthetic(args))


def _load(spec: DataSpec) -> Sequence[PatientRecord]:
    if spec.kind in {"jsonl", "csv"}:
        from common.data.serialized import load_serialized

        return load_serialized(spec.path, spec.kind)
    if spec.kind == "mimic4":
        return _mimic4(spec)
    if spec.kind == "meds":
        from common.data.meds import load_meds

        return load_meds(
            spec.path,
            task=spec.options.get("labels") or None,
            hours=spec.int_option("hours", 48),
            site=spec.options.get("site") or None,
            cache=spec.options.get("cache"),
        )
    if spec.kind == "eicu":
        from common.data.eicu import load_eicu

        records = load_eicu(
            spec.path, site=spec.option("site", "region"), hours=spec.float_option("hours", 24.0),
            cache=spec.options.get("cache"), engine=_engine(spec),
        )
        if spec.options.get("select"):
            from common.data.select import select_site

            return select_site(records, spec.options["select"], f"eicu:{spec.location}",
                               "select")
        return records
    return _synthetic(spec.location)


def _engine(spec: DataSpec) -> str:
    engine = spec.option("engine", "duckdb").strip().lower()
    if engine not in {"duckdb", "python"}:
        raise FedmergeError(
            f"data spec {spec.kind}:{spec.location}: option 'engine={engine}' must be duckdb "
            "(the query engine) or python (the previous row-by-row reference)"
        )
    return engine


def _mimic4(spec: DataSpec) -> Sequence[PatientRecord]:
    site = spec.options.get("site") or None
    demographics = spec.bool_option("demographics", False)
    if _engine(spec) == "python":
        from common.data.mimic4_python import load_mimic4_python

        ignored = sorted(set(spec.options) - {"hours", "demographics", "site", "engine"})
        if ignored:
            raise FedmergeError(
                f"data spec {spec.kind}:{spec.location}: engine=python is the previous loader "
                f"and does not apply option '{ignored[0]}'"
            )
        return load_mimic4_python(
            spec.path, hours=spec.float_option("hours", 48.0), demographics=demographics, site=site
        )
    from pydantic import ValidationError

    from common.data.mimic4 import Mimic4Settings, load_mimic4
    from common.errors import validation_error

    raw = {
        "hours": spec.int_option("hours", 48),
        "bucket": spec.int_option("bucket", 2),
        "pred_window": spec.int_option("pred_window", 0, minimum=0),
        "outlier": spec.float_option("outlier", 98.0),
        "outlier_low": spec.option("outlier_low", "0") or 0,  # pydantic checks the number
        "icd_map": spec.options.get("icd_map") or None,
        "demographics": demographics,
    }
    try:
        settings = Mimic4Settings(**raw)
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            raise validation_error(f"data spec {spec.kind}:{spec.location}", exc) from None
        raise FedmergeError(f"data spec {spec.kind}:{spec.location}: {exc}") from None
    return load_mimic4(spec.path, settings, site=site, cache=spec.options.get("cache"))


def _check(records: Sequence[PatientRecord], spec: str) -> None:
    """What every source must satisfy, whichever loader built the records (read from the
    stay id column when they are lazy, so checking builds nothing)."""
    from common.data.lazy import stay_ids

    if not records:
        raise FedmergeError(f"data spec {spec}: no records (expected at least one labelled stay)")
    seen: set[str] = set()
    for index, stay_id in enumerate(stay_ids(records)):
        if stay_id in seen:
            raise FedmergeError(f"data spec {spec}: duplicate stay id '{stay_id}' (record {index})")
        seen.add(stay_id)


def load_records(spec: str, *, hard: bool = False) -> Sequence[PatientRecord]:
    """Every labelled stay named by `spec`; `hard` keeps only the numeric sections.

    A list, or for the table-backed sources (mimic4, eicu, meds) a `LazyRecords` whose
    records are built when first read (see `common.data.lazy`).
    """
    records = _load(parse_spec(spec))
    _check(records, spec)
    if not hard:
        return records
    if spec.partition(":")[0].strip().lower() in {"jsonl", "csv"}:
        raise FedmergeError(
            f"data spec {spec}: the hard variant needs structured sections, but jsonl/csv "
            "records are plain text (use mimic4: or eicu:, or a file already in the hard form)"
        )
    from common.data.lazy import LazyRecords, hard_variant

    if isinstance(records, LazyRecords):  # table-backed records always have sections
        return records.hard()
    try:
        return [hard_variant(r) for r in records]
    except ValueError as exc:
        raise FedmergeError(f"data spec {spec}: {exc}") from None

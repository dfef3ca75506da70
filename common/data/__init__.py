"""Patient data loaders, chosen by a data spec string.

`load_records("eicu:/data/eicu?site=hospital")` and friends turn a hospital's data into the
`PatientRecord`s every other module consumes, whatever the source format. Specs:
`jsonl:PATH`, `csv:PATH`, `mimic4:DIR[?hours=48&demographics=1&site=NAME]`,
`eicu:DIR[?site=region|hospital&hours=24&select=NAME]` (`select` keeps one region or
hospital), `synthetic:ARGS` (`site=I` keeps one hospital) (the built-in synthetic cohort).
"""

from __future__ import annotations

from common.data.spec import DataSpec, parse_spec
from common.errors import FedmergeError
from common.records import PatientRecord

__all__ = ["DataSpec", "load_records", "parse_spec"]


def _synthetic(args: str) -> list[PatientRecord]:
    from common.data.synthetic import load_synthetic

    return list(load_synthetic(args))


def _load(spec: DataSpec) -> list[PatientRecord]:
    if spec.kind in {"jsonl", "csv"}:
        from common.data.serialized import load_serialized

        return load_serialized(spec.path, spec.kind)
    if spec.kind == "mimic4":
        from common.data.mimic4 import load_mimic4

        return load_mimic4(
            spec.path,
            hours=spec.float_option("hours", 48.0),
            demographics=spec.bool_option("demographics", False),
            site=spec.options.get("site") or None,
        )
    if spec.kind == "eicu":
        from common.data.eicu import load_eicu

        records = load_eicu(
            spec.path, site=spec.option("site", "region"), hours=spec.float_option("hours", 24.0)
        )
        if spec.options.get("select"):
            from common.data.select import select_site

            return select_site(records, spec.options["select"], f"eicu:{spec.location}",
                               "select")
        return records
    return _synthetic(spec.location)


def _check(records: list[PatientRecord], spec: str) -> None:
    """What every source must satisfy, whichever loader built the records."""
    if not records:
        raise FedmergeError(f"data spec {spec}: no records (expected at least one labelled stay)")
    seen: set[str] = set()
    for index, record in enumerate(records):
        if record.stay_id in seen:
            raise FedmergeError(
                f"data spec {spec}: duplicate stay id '{record.stay_id}' (record {index})"
            )
        seen.add(record.stay_id)


def load_records(spec: str, *, hard: bool = False) -> list[PatientRecord]:
    """Load every labelled stay named by `spec`; `hard` keeps only the numeric sections."""
    records = _load(parse_spec(spec))
    _check(records, spec)
    if not hard:
        return records
    if spec.partition(":")[0].strip().lower() in {"jsonl", "csv"}:
        raise FedmergeError(
            f"data spec {spec}: the hard variant needs structured sections, but jsonl/csv "
            "records are plain text (use mimic4: or eicu:, or a file already in the hard form)"
        )
    # A structured stay with nothing recorded has no sections and an empty text either way.
    try:
        return [r.hard() if r.sections or r.text else r for r in records]
    except ValueError as exc:
        raise FedmergeError(f"data spec {spec}: {exc}") from None

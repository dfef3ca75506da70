"""MEDS (Medical Event Data Standard) event streams + a task-label table → PatientRecords.

MEDS is what the MIMIC-IV-MEDS and eICU-MEDS ETLs (and most new clinical ML tooling) produce:
`DIR/data/**/*.parquet` with one event per row (`subject_id` int64, `time` timestamp,
`code` string, `numeric_value` float; schema `meds.DataSchema`), optional code descriptions in
`DIR/metadata/codes.parquet`, and task labels (`meds.LabelSchema`: `subject_id`,
`prediction_time`, `boolean_value`) in a Parquet file or directory given by `labels=PATH`
(relative to DIR or absolute; default `DIR/labels`).

One record per label row. The observation window is the label's own: the `hours` before its
`prediction_time`, that instant included — nothing after the prediction time can reach the
text. Events are serialized into the same sections as the MIMIC-IV loader
(`common.data.mimic_text`), chosen by the code's first `//` part as the MEDS ETLs write them:

    DIAGNOSIS                              → diagnoses (titles, in order of first time)
    LAB, VITAL, CHART                      → chart events (mean numeric_value per code)
    MEDICATION, INFUSION_START, DRUG       → medications (mean numeric_value per code)
    PROCEDURE                              → procedures
    SUBJECT_FLUID_OUTPUT, OUTPUT           → outputs

Other codes (admissions, transfers, birth, death, ...) are not rendered: a death code is the
label's own information. An item reads as its description in `metadata/codes.parquet`, else
the code itself. Records are keyed `subject_id`, or `subject_id@prediction_time` when a subject
has several labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.data import cohort_cache, progress
from common.data import mimic_text as text
from common.data.duck import sql_string
from common.errors import FedmergeError
from common.records import PatientRecord

SOURCE = "meds"
SECTION_OF = {
    "DIAGNOSIS": "diagnoses",
    "LAB": "chart_events", "VITAL": "chart_events", "CHART": "chart_events",
    "MEDICATION": "medications", "INFUSION_START": "medications", "DRUG": "medications",
    "PROCEDURE": "procedures",
    "SUBJECT_FLUID_OUTPUT": "outputs", "OUTPUT": "outputs",
}  # fmt: skip
DATA_COLUMNS = {"subject_id": "integer", "time": "timestamp", "code": "string",
                "numeric_value": "floating"}  # fmt: skip
LABEL_COLUMNS = {"subject_id": "integer", "prediction_time": "timestamp",
                 "boolean_value": "boolean"}  # fmt: skip


def _is(kind: str, dtype: pa.DataType) -> bool:
    return {
        "integer": pa.types.is_integer,
        "timestamp": pa.types.is_timestamp,
        "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "floating": pa.types.is_floating,
        "boolean": pa.types.is_boolean,
    }[kind](dtype)


def _parquet_files(path: Path, table: str) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else []
    if not files:
        raise FedmergeError(f"{path}: MEDS {table} table not found (expected Parquet files)")
    return files


def _check_schema(files: list[Path], columns: dict[str, str], table: str) -> None:
    """Every file has every column with the standard's type: one clear error otherwise."""
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise FedmergeError(f"{path}: not a readable Parquet file ({exc})") from None
        for name, kind in columns.items():
            if name not in schema.names:
                raise FedmergeError(f"{path}: MEDS {table} table: missing column '{name}'")
            dtype = schema.field(name).type
            if not _is(kind, dtype):
                raise FedmergeError(
                    f"{path}: MEDS {table} table: column '{name}' is {dtype}, expected {kind} "
                    "(the MEDS schema)"
                )


def _literal(paths: list[Path]) -> str:
    return "[" + ", ".join(sql_string(str(p)) for p in paths) + "]"


def _build(data: list[Path], labels: list[Path], codes: Path | None, hours: int) -> pa.Table:
    from common.data import duck

    with duck.connect() as con:
        duck.run(con, f"""CREATE TEMP TABLE labels AS
            SELECT subject_id, prediction_time, boolean_value,
                   row_number() OVER (ORDER BY subject_id, prediction_time) AS rid,
                   count(*) OVER (PARTITION BY subject_id) AS per_subject
            FROM read_parquet({_literal(labels)})""", str(labels[0]))  # fmt: skip
        bad = duck.rows(con, "SELECT subject_id FROM labels WHERE subject_id IS NULL OR "
                        "prediction_time IS NULL OR boolean_value IS NULL LIMIT 1",
                        SOURCE)  # fmt: skip
        if bad:
            raise FedmergeError(f"{labels[0]}: MEDS label table: a row of subject "
                                f"{bad[0][0]} lacks prediction_time or boolean_value")
        duck.run(con, f"CREATE VIEW events AS SELECT subject_id, time, code, numeric_value "
                 f"FROM read_parquet({_literal(data)})", str(data[0]))  # fmt: skip
        unknown = duck.rows(con, "SELECT DISTINCT subject_id FROM labels ANTI JOIN "
                            "(SELECT DISTINCT subject_id FROM events) USING (subject_id) "
                            "ORDER BY subject_id LIMIT 1", SOURCE)  # fmt: skip
        if unknown:
            raise FedmergeError(
                f"{labels[0]}: MEDS label table: column 'subject_id': subject {unknown[0][0]} "
                f"has no events in {data[0].parent}"
            )
        if codes is not None:
            duck.run(con, f"CREATE TEMP TABLE codes AS SELECT code, any_value(description) "
                     f"AS description FROM read_parquet({_literal([codes])}) GROUP BY code",
                     str(codes))  # fmt: skip
        else:
            con.execute("CREATE TEMP TABLE codes (code VARCHAR, description VARCHAR)")
        kinds = " ".join(f"WHEN '{k}' THEN '{v}'" for k, v in SECTION_OF.items())
        duck.run(con, f"""CREATE TEMP TABLE windowed AS
            SELECT l.rid, e.code, e.numeric_value, e.time,
                   CASE split_part(e.code, '//', 1) {kinds} END AS section
            FROM events e JOIN labels l USING (subject_id)
            WHERE e.time IS NOT NULL AND e.time <= l.prediction_time
              AND e.time > l.prediction_time - INTERVAL {int(hours)} HOUR""",
                 str(data[0]))  # fmt: skip
        name = text.sql_words("coalesce(c.description, w.code)")
        numeric = f"{text.sql_mean('w.value')}"

        def items(section: str, header: str, value: bool, joiner: str) -> str:
            mean = text.sql_avg("numeric_value") if value else "NULL"
            keep = "numeric_value IS NOT NULL" if value else "TRUE"
            item = f"{numeric} || '{joiner}' || {name}" if value else name
            return f"""{section} AS (SELECT w.rid, {text.sql_sentence(header, item, 'w.code')}
                AS sentence FROM (SELECT rid, code, {mean} AS value FROM windowed
                WHERE section = '{section}' AND {keep} GROUP BY rid, code) w
                LEFT JOIN codes c USING (code) GROUP BY w.rid)"""

        sql = f"""
            WITH {items('chart_events', text.CHART_HEADER, True, ' for ')},
                 {items('medications', text.MEDS_HEADER, True, ' of ')},
                 {items('procedures', text.PROCEDURES_HEADER, False, '')},
                 {items('outputs', text.OUTPUTS_HEADER, False, '')},
                 diagnoses AS (SELECT rid, 'The patient is diagnosed with ' ||
                     {text.sql_joined('title', 'first', 'title')} || '.' AS sentence
                   FROM (SELECT w.rid, {name} AS title, min(w.time) AS first
                         FROM windowed w LEFT JOIN codes c USING (code)
                         WHERE w.section = 'diagnoses' GROUP BY ALL) GROUP BY rid)
            SELECT CASE WHEN l.per_subject = 1 THEN CAST(l.subject_id AS VARCHAR)
                        ELSE CAST(l.subject_id AS VARCHAR) || '@' ||
                             strftime(l.prediction_time, '%Y-%m-%dT%H:%M:%S') END AS stay_id,
                   CAST(l.boolean_value AS TINYINT) AS label,
                   diagnoses.sentence AS diagnoses, chart_events.sentence AS chart_events,
                   medications.sentence AS medications, procedures.sentence AS procedures,
                   outputs.sentence AS outputs
            FROM labels l LEFT JOIN diagnoses USING (rid) LEFT JOIN chart_events USING (rid)
            LEFT JOIN medications USING (rid) LEFT JOIN procedures USING (rid)
            LEFT JOIN outputs USING (rid) ORDER BY l.rid"""
        return duck.arrow(con, sql, SOURCE)


def load_meds(
    directory: Path,
    *,
    task: str | None = None,
    hours: int = 48,
    site: str | None = None,
    cache: str | None = None,
) -> Sequence[PatientRecord]:
    """One record per label row of a MEDS dataset (see module doc)."""
    if not directory.is_dir():
        raise FedmergeError(f"{directory}: MEDS directory not found")
    data = _parquet_files(directory / "data", "data")
    label_path = Path(task).expanduser() if task else directory / "labels"
    if not label_path.is_absolute():
        label_path = directory / label_path
    labels = _parquet_files(label_path, "label")
    _check_schema(data, DATA_COLUMNS, "data")
    _check_schema(labels, LABEL_COLUMNS, "label")
    codes = directory / "metadata" / "codes.parquet"
    codes_file = codes if codes.is_file() else None
    if codes_file:
        _check_schema([codes_file], {"code": "string", "description": "string"}, "codes")
    files = data + labels + ([codes_file] if codes_file else [])
    store = cohort_cache.cache_dir(directory, cache)
    key = cohort_cache.cache_key(SOURCE, files, {"hours": hours})
    table = cohort_cache.read_cached(store, key)
    if table is None:
        with progress.step(SOURCE, f"events of {len(data)} file(s), labels of {len(labels)}"):
            table = _build(data, labels, codes_file, hours)
        cohort_cache.write_cached(store, key, table)
    return text.records_from_table(table, site)

"""MIMIC-IV 2.2 CSV tables (hosp/, icu/) → the HF Mimic4Dataset mortality cohort and its text.

PatientDx tuned and scored on the HF dataset thbndi/Mimic4Dataset, which the healthylaife
MIMIC-IV-Data-Pipeline builds with its mortality settings. This loader reimplements the
pipeline's rules (no code copied) so that the same export yields the same stays, labels and
sentences. Where the pipeline's code and the dataset card disagree, the code is followed: the
card speaks of adult stays and of the first 48 hours; the code takes adults by `anchor_age`
(not the age at the stay, also in the demographic sentence), keeps only stays that last the
whole window, and removes outliers on both sides (`outlier_low`, 0 by default), as below.

Cohort (`preprocessing/day_intervals_preproc/day_intervals_cohort.py`, `get_visit_pts` and
`partition_by_mort`): ICU stays joined to `patients` and, inner, to `admissions` (a stay whose
admission row is missing is dropped); adults by `anchor_age >= 18` (the pipeline's code; the
year-shifted age its comment describes is commented out there, so a 17-year-old anchor who
turns 18 later is *not* adult); label 1 when `dod` (a date, read as midnight) lies in
[intime, outtime]. Then `model/data_generation_icu.py` (`generate_adm`, `mortality_length`):
the stay length in whole hours (`floor((outtime - intime) / 1 h)`) must be at least
`hours + pred_window`, so stays shorter than the window are *not* in the mortality cohort.

Time: an event's hour is `floor((time - intime) / 1 h)`; the window keeps hours 0 .. hours-1,
cut into buckets of `bucket` hours (`smooth_meds`, default 2 h as in the dataset's config);
`hours` must be a multiple of `bucket`.

Chart events (`utils/icu_preprocess_util.py` `preproc_chart`, `utils/uom_conversion.py`,
`utils/outlier_removal.py`): rows need stay, time, itemid, `valuenum` and `valueuom`;
duplicates dropped; per itemid, when one unit has more than 95 % of the rows, rows in other
units are dropped; then per itemid the values above the `outlier` percentile (98) or below the
`outlier_low` percentile (0) of *all* the cohort's rows of that item (every stay, every time,
before the window is applied) are removed (numpy's linear percentile). The value in the text is
the mean over the buckets that have a value of each bucket's mean.

Medications (`preproc_meds`, `generate_meds`): inputevents rows need subject, stay, itemid,
start, end, `rate`, `amount` and `orderid` (the pipeline's `dropna`: a bolus without a rate is
dropped) and must end in a later hour than they start; per bucket, the mean amount of each
order, averaged over the orders, then over the buckets. Procedures: distinct (stay, start,
itemid). Outputs: rows with every column filled (the pipeline's `dropna` over the whole table).

Diagnoses: ICD-10 codes are grouped to their three-character root, whose `d_icd_diagnoses`
title is rendered (or `ICD-10 <root>` where the export has no title for the root), in the
order of their first `seq_num`. ICD-9 codes go through the pipeline's ICD-9 → ICD-10 table when
the user gives it (`icd_map=PATH`, see `common.data.icd_map`); without it they keep their own
ICD-9 title, the one deviation left, announced on stderr.

Not verifiable offline: the HF dataset script's own final averaging (its code is not in the
pipeline repository); the mean of bucket means above is what the pipeline's data dictionaries
hold. `common.data.mimic4_python` keeps the previous, simpler loader for comparison.

The tables are read in place, CSV or CSV.gz, by DuckDB (`common.data.duck`), with a memory cap
and spilling (chartevents.csv.gz through `common.data.chunked`); the finished cohort is cached
as a memory-mapped Arrow file (`common.data.cohort_cache`) and its records are built when read
(`common.data.lazy`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.data import chunked, cohort_cache, duck, progress
from common.data import mimic_text as text
from common.data.icd_map import read_icd_map
from common.data.lazy import LazyRecords
from common.data.tables import find_table
from common.errors import FedmergeError

records_from_table = text.records_from_table

ADULT_AGE = 18
SOURCE = "mimic4"

TABLES: dict[str, dict[str, str]] = {
    "hosp/patients": {
        "subject_id": "BIGINT", "gender": "VARCHAR", "anchor_age": "INTEGER", "dod": "VARCHAR",
    },
    "hosp/admissions": {"hadm_id": "BIGINT", "race": "VARCHAR", "insurance": "VARCHAR"},
    "hosp/diagnoses_icd": {
        "hadm_id": "BIGINT", "seq_num": "INTEGER", "icd_code": "VARCHAR", "icd_version": "INTEGER",
    },
    "hosp/d_icd_diagnoses": {
        "icd_code": "VARCHAR", "icd_version": "INTEGER", "long_title": "VARCHAR",
    },
    "icu/icustays": {
        "subject_id": "BIGINT", "hadm_id": "BIGINT", "stay_id": "BIGINT",
        "intime": "TIMESTAMP", "outtime": "TIMESTAMP",
    },
    "icu/d_items": {"itemid": "BIGINT", "label": "VARCHAR"},
    "icu/chartevents": {
        "stay_id": "BIGINT", "charttime": "TIMESTAMP", "itemid": "BIGINT",
        "valuenum": "DOUBLE", "valueuom": "VARCHAR",
    },
    "icu/inputevents": {
        "subject_id": "BIGINT", "stay_id": "BIGINT", "itemid": "BIGINT",
        "starttime": "TIMESTAMP", "endtime": "TIMESTAMP", "rate": "DOUBLE", "amount": "DOUBLE",
        "orderid": "BIGINT",
    },
    "icu/procedureevents": {"stay_id": "BIGINT", "starttime": "TIMESTAMP", "itemid": "BIGINT"},
    "icu/outputevents": {"stay_id": "BIGINT", "charttime": "TIMESTAMP", "itemid": "BIGINT"},
}  # fmt: skip


class Mimic4Settings(BaseModel):
    """Everything that shapes the cohort; part of the cache key."""

    model_config = ConfigDict(frozen=True)

    hours: int = Field(48, gt=0)
    bucket: int = Field(2, gt=0)
    pred_window: int = Field(0, ge=0)
    outlier: float = Field(98.0, gt=0, le=100)
    outlier_low: float = Field(0.0, ge=0, lt=100)
    unit_share: float = Field(0.95, gt=0, le=1)
    icd_map: str | None = None
    demographics: bool = False

    @model_validator(mode="after")
    def _whole_buckets(self) -> Mimic4Settings:
        if self.hours % self.bucket:
            raise ValueError(f"hours={self.hours} is not a multiple of bucket={self.bucket}")
        if self.outlier_low >= self.outlier:
            raise ValueError("outlier_low must be below outlier")
        return self


def _hour(time: str, start: str) -> str:
    """SQL for the pipeline's whole hours since `start` (floor, negative before it)."""
    return f"floor((epoch_us({time}) - epoch_us({start})) / 3600e6)"


def _tables(directory: Path) -> dict[str, Path]:
    return {name: find_table(directory / name.split("/")[0], name.split("/")[1])
            for name in TABLES}  # fmt: skip


def _check_cohort(con, paths: dict[str, Path]) -> None:
    stays, patients = paths["icu/icustays"], paths["hosp/patients"]
    dup = duck.rows(con, "SELECT stay_id, count(*) FROM icustays GROUP BY stay_id "
                    "HAVING count(*) > 1 ORDER BY stay_id LIMIT 1", str(stays))  # fmt: skip
    if dup:
        raise FedmergeError(
            f"{stays}: column 'stay_id': duplicate stay_id '{dup[0][0]}' ({dup[0][1]} rows)"
        )
    blank = duck.rows(con, "SELECT count(*) FROM icustays WHERE stay_id IS NULL", str(stays))
    if blank[0][0]:
        raise FedmergeError(f"{stays}: column 'stay_id' is blank in {blank[0][0]} row(s)")
    orphan = duck.rows(con, "SELECT subject_id FROM icustays ANTI JOIN patients "
                       "USING (subject_id) ORDER BY subject_id LIMIT 1", str(stays))  # fmt: skip
    if orphan:
        raise FedmergeError(
            f"{stays}: column 'subject_id': subject '{orphan[0][0]}' has no row in {patients}"
        )
    bad_dod = duck.rows(con, "SELECT dod FROM patients WHERE dod IS NOT NULL "
                        "AND TRY_CAST(left(dod, 10) AS DATE) IS NULL LIMIT 1", str(patients))
    if bad_dod:
        raise FedmergeError(
            f"{patients}: column 'dod': '{bad_dod[0][0]}' is not a date (YYYY-MM-DD)"
        )


def _scan(paths: dict[str, Path], name: str) -> str:
    return duck.scan(paths[name], TABLES[name])


def _window(s: Mimic4Settings) -> str:
    """SQL condition: hour `h` lies in the window and before the stay's end (`los_hours`)."""
    return f"h >= 0 AND h < {s.hours} AND h < los_hours"


def _build(con, paths: dict[str, Path], s: Mimic4Settings,
           temp_dir: Path | None = None) -> pa.Table:  # fmt: skip
    """The cohort table: stays, then the event tables, then the rendered sentences.

    chartevents is inflated in a thread and parsed chunk by chunk (`_chart_rows`); the other
    tables (medications, procedures, outputs, diagnoses) are read meanwhile on a second
    connection to the same database. Measured on the 40k-stay bench (2 cores): their 0.9 s of
    reading overlaps the chart read, which itself slows by about 0.5 s, so the first load gains
    about 0.4 s. Plain (not TEMP) tables: a TEMP table is private to the connection that made
    it. `temp_dir` holds the uncompressed chunks where no memory-backed directory has room
    (`chunked.scratch_dir`; the system's temporary directory if None).
    """
    _cohort(con, paths, s)
    side = con.cursor()  # another connection to the same in-memory database
    try:
        with ThreadPoolExecutor(1) as pool:  # leaving the block waits for the other reads
            others = pool.submit(_other_events, side, paths, s)
            try:
                _chart_events(con, paths, s, temp_dir)
            except BaseException:
                side.interrupt()  # the chart error is the one reported: stop the rest early
                raise
        others.result()  # raises the other reads' error, if any
    finally:
        side.close()
    _check_items(con, paths)
    return _collect(con, s)


def _cohort(con, paths: dict[str, Path], s: Mimic4Settings) -> None:
    """Tables `adults` (every adult stay) and `kept` (those long enough for the window)."""
    def scan(name: str) -> str:
        return _scan(paths, name)

    with progress.step(SOURCE, "cohort (patients, admissions, icustays)"):
        duck.run(con, f"CREATE TABLE patients AS SELECT * FROM {scan('hosp/patients')}",
                 str(paths["hosp/patients"]))  # fmt: skip
        duck.run(con, f"CREATE TABLE icustays AS SELECT * FROM {scan('icu/icustays')}",
                 str(paths["icu/icustays"]))  # fmt: skip
        _check_cohort(con, paths)
        duck.run(con, f"""CREATE TABLE adults AS
            SELECT i.stay_id, i.hadm_id, i.intime, i.outtime, p.anchor_age AS age, p.gender,
                   a.race, a.insurance,
                   CAST({_hour('i.outtime', 'i.intime')} AS BIGINT) AS los_hours,
                   CASE WHEN CAST(CAST(left(p.dod, 10) AS DATE) AS TIMESTAMP)
                             BETWEEN i.intime AND i.outtime THEN 1 ELSE 0 END AS label
            FROM icustays i JOIN patients p USING (subject_id)
            JOIN (SELECT hadm_id, any_value(race) AS race, any_value(insurance) AS insurance
                  FROM {scan('hosp/admissions')} GROUP BY hadm_id) a ON a.hadm_id = i.hadm_id
            WHERE p.anchor_age >= {ADULT_AGE} AND i.intime IS NOT NULL
              AND i.outtime IS NOT NULL""", str(paths["hosp/admissions"]))  # fmt: skip
        duck.run(con, f"""CREATE TABLE kept AS SELECT * FROM adults
            WHERE los_hours >= {s.hours + s.pred_window}""", SOURCE)  # fmt: skip
        count = duck.rows(con, "SELECT count(*) FROM kept", SOURCE)[0][0]
    if not count:
        raise FedmergeError(
            f"{paths['icu/icustays']}: no adult ICU stay of at least {s.hours + s.pred_window} "
            f"hours (the mortality cohort needs anchor_age >= {ADULT_AGE} and a row in "
            "hosp/admissions)"
        )
    progress.say(f"{SOURCE}: {count} stays in the cohort")


def _chart_rows(con, path: Path, temp_dir: Path | None) -> None:
    """Table `chart`: one narrow row per distinct chart value of an adult stay.

    The unit as a 64-bit hash and the time as microseconds since intime keep the table small
    on 300 M rows. A gzipped file is read as uncompressed chunks inflated in a thread
    (`common.data.chunked`), so DuckDB parses on every core while the next chunk inflates;
    measured on the 40k-stay bench (2 cores, one of them busy with other work), the read went
    from 7.1 s to 3.9 s, plus 0.7 s for the DISTINCT that now runs once after the chunks.
    The rows are read without the join to `adults`: joined while parsing, each row carried its
    unit text through the join (single-thread: 3.5 s against 2.6 s without); joined in the
    DISTINCT, on fixed-width columns, it costs almost nothing (1.00 s against 0.96 s).
    Distinct on the time since intime is distinct on the time, intime being the stay's.
    """
    def select(read: Path | None) -> str:
        return f"""SELECT c.stay_id, c.itemid, c.valuenum, hash(c.valueuom) AS unit,
                   epoch_us(c.charttime) AS t
            FROM {duck.scan(path, TABLES['icu/chartevents'], read)} c
            WHERE c.valuenum IS NOT NULL AND c.valueuom IS NOT NULL
              AND c.charttime IS NOT NULL AND c.itemid IS NOT NULL"""

    def distinct(rows: str) -> str:
        return f"""CREATE TABLE chart AS
            SELECT DISTINCT c.stay_id, c.itemid, c.valuenum, c.unit,
                   c.t - epoch_us(a.intime) AS us
            FROM {rows} c JOIN adults a ON a.stay_id = c.stay_id"""

    if not chunked.is_gzip(path):  # DuckDB reads a plain CSV in parallel by itself
        duck.run(con, distinct(f"({select(None)})"), str(path))
        return
    duck.run(con, f"CREATE TABLE chart_rows AS {select(None)} LIMIT 0", str(path))
    for chunk in chunked.chunks(path, chunked.scratch_dir(temp_dir)):
        duck.run(con, f"INSERT INTO chart_rows {select(chunk.path)}", str(path),
                 chunk=(str(path), chunk.first_line - 2))  # chunk line 2 = first row
    duck.run(con, distinct("chart_rows"), str(path))
    duck.run(con, "DROP TABLE chart_rows", str(path))


def _chart_events(con, paths: dict[str, Path], s: Mimic4Settings,
                  temp_dir: Path | None = None) -> None:  # fmt: skip
    """Table `chart_means`: per kept stay and item, the mean of the bucket means.

    Both percentiles in one `quantile_cont` (one collection of each item's values, not two),
    and the rows in a kept unit filtered twice rather than materialized once (a copy of the
    4.4 M rows cost more than a second semi join): about 1.0 against 1.1-1.4 CPU-s on the
    bench (noisy, shared machine).
    """
    in_window = _window(s)
    with progress.step(SOURCE, f"chart events ({paths['icu/chartevents'].name})"):
        _chart_rows(con, paths["icu/chartevents"], temp_dir)
        duck.run(con, f"""CREATE TABLE units AS
            WITH n AS (SELECT itemid, unit, count(*) AS rows FROM chart GROUP BY ALL),
                 t AS (SELECT itemid, sum(rows) AS total, count(*) AS kinds, max(rows) AS top
                       FROM n GROUP BY itemid)
            SELECT n.itemid, n.unit FROM n JOIN t USING (itemid)
            WHERE t.kinds = 1 OR t.top <= {s.unit_share} * t.total OR n.rows = t.top""",
                 SOURCE)  # fmt: skip
        duck.run(con, f"""CREATE TABLE chart_means AS
            WITH kept_units AS NOT MATERIALIZED (SELECT c.* FROM chart c SEMI JOIN units u
                                ON u.itemid = c.itemid AND u.unit = c.unit),
                 q AS (SELECT itemid, quantile_cont(valuenum,
                                [{s.outlier_low / 100}, {s.outlier / 100}]) AS q
                       FROM kept_units GROUP BY itemid),
                 bounds AS (SELECT itemid, q[1] AS lo, q[2] AS hi FROM q),
                 timed AS (SELECT c.stay_id, c.itemid, c.valuenum, k.los_hours,
                                  floor(c.us / 3600e6) AS h
                           FROM kept_units c JOIN kept k USING (stay_id)),
                 buckets AS (SELECT t.stay_id, t.itemid, floor(t.h / {s.bucket}) AS b,
                                    {text.sql_avg('t.valuenum')} AS mean
                             FROM timed t JOIN bounds USING (itemid)
                             WHERE {in_window} AND t.valuenum BETWEEN bounds.lo AND bounds.hi
                             GROUP BY ALL)
            SELECT stay_id, itemid, {text.sql_avg('mean')} AS value FROM buckets GROUP BY ALL""",
                 SOURCE)  # fmt: skip
        duck.run(con, "DROP TABLE chart", SOURCE)


def _other_events(con, paths: dict[str, Path], s: Mimic4Settings) -> None:
    """Tables `med_means`, `procedures`, `outputs`, `items` and `diagnoses`."""
    def scan(name: str) -> str:
        return _scan(paths, name)

    in_window = _window(s)
    with progress.step(SOURCE, "medications, procedures, outputs"):
        duck.run(con, f"""CREATE TABLE med_means AS
            WITH timed AS (SELECT m.stay_id, m.itemid, m.orderid, m.amount, k.los_hours,
                                  {_hour('m.starttime', 'k.intime')} AS h,
                                  {_hour('m.endtime', 'k.intime')} AS h_end
                           FROM {scan('icu/inputevents')} m JOIN kept k USING (stay_id)
                           WHERE m.subject_id IS NOT NULL AND m.itemid IS NOT NULL
                             AND m.starttime IS NOT NULL AND m.endtime IS NOT NULL
                             AND m.rate IS NOT NULL AND m.amount IS NOT NULL
                             AND m.orderid IS NOT NULL),
                 orders AS (SELECT stay_id, itemid, orderid, floor(h / {s.bucket}) AS b,
                                   {text.sql_avg('amount')} AS mean
                            FROM timed WHERE h_end - h > 0 AND {in_window} GROUP BY ALL),
                 buckets AS (SELECT stay_id, itemid, b, {text.sql_avg('mean')} AS mean FROM orders
                             GROUP BY ALL)
            SELECT stay_id, itemid, {text.sql_avg('mean')} AS value FROM buckets GROUP BY ALL""",
                 str(paths["icu/inputevents"]))  # fmt: skip
        duck.run(con, f"""CREATE TABLE procedures AS
            SELECT DISTINCT stay_id, itemid FROM (
              SELECT p.stay_id, p.itemid, k.los_hours, {_hour('p.starttime', 'k.intime')} AS h
              FROM (SELECT DISTINCT * FROM {scan('icu/procedureevents')}) p
              JOIN kept k USING (stay_id)
              WHERE p.starttime IS NOT NULL AND p.itemid IS NOT NULL) WHERE {in_window}""",
                 str(paths["icu/procedureevents"]))  # fmt: skip
        out_path = paths["icu/outputevents"]
        every_column = " AND ".join(f'o."{c}" IS NOT NULL' for c in duck.header(out_path))
        out_scan = duck.scan(out_path, {c: TABLES["icu/outputevents"].get(c, "VARCHAR")
                                        for c in duck.header(out_path)})  # fmt: skip
        duck.run(con, f"""CREATE TABLE outputs AS
            SELECT DISTINCT stay_id, itemid FROM (
              SELECT o.stay_id, o.itemid, k.los_hours, {_hour('o.charttime', 'k.intime')} AS h
              FROM {out_scan} o JOIN kept k USING (stay_id) WHERE {every_column})
            WHERE {in_window}""", str(out_path))  # fmt: skip

    duck.run(con, f"CREATE TABLE items AS SELECT itemid, "
             f"{text.sql_words('any_value(label)')} AS label "
             f"FROM {scan('icu/d_items')} GROUP BY itemid", str(paths["icu/d_items"]))  # fmt: skip
    with progress.step(SOURCE, "diagnoses"):
        _diagnoses(con, paths, s)
    _render_others(con)


def _check_items(con, paths: dict[str, Path]) -> None:
    """Every event item must be described in d_items (its label is the text)."""
    for table, source in (("chart_means", "icu/chartevents"), ("med_means", "icu/inputevents"),
                          ("procedures", "icu/procedureevents"), ("outputs", "icu/outputevents")):
        unknown = duck.rows(con, f"SELECT itemid FROM {table} ANTI JOIN items USING (itemid) "
                            "ORDER BY itemid LIMIT 1", SOURCE)  # fmt: skip
        if unknown:
            raise FedmergeError(f"{paths[source]}: column 'itemid': '{unknown[0][0]}' has no row "
                                f"in {paths['icu/d_items']}")  # fmt: skip


def _diagnoses(con, paths: dict[str, Path], s: Mimic4Settings) -> None:
    """Each kept stay's diagnosis titles in the order of their first seq_num (see module doc)."""
    if s.icd_map:
        mapping = read_icd_map(Path(s.icd_map).expanduser())
        con.execute("CREATE TABLE icd_map (root9 VARCHAR, icd10 VARCHAR)")
        con.executemany("INSERT INTO icd_map VALUES (?, ?)", list(mapping.items()))
        nine = "left(m.icd10, 3)"
    else:
        con.execute("CREATE TABLE icd_map (root9 VARCHAR, icd10 VARCHAR)")
        nine = "d.icd_code"
    duck.run(con, f"""CREATE TABLE titles AS SELECT icd_code, icd_version,
        any_value(long_title) AS long_title FROM {duck.scan(paths['hosp/d_icd_diagnoses'],
        TABLES['hosp/d_icd_diagnoses'])} GROUP BY ALL""",
             str(paths["hosp/d_icd_diagnoses"]))  # fmt: skip
    mapped = "m.icd10 IS NOT NULL" if s.icd_map else "TRUE"
    duck.run(con, f"""CREATE TABLE diagnoses AS
        WITH d AS (SELECT d.hadm_id, d.seq_num, trim(d.icd_code) AS icd_code, d.icd_version
                   FROM {duck.scan(paths['hosp/diagnoses_icd'], TABLES['hosp/diagnoses_icd'])} d
                   SEMI JOIN kept k ON k.hadm_id = d.hadm_id WHERE d.icd_code IS NOT NULL),
             grouped AS (
               SELECT d.hadm_id, d.seq_num, left(d.icd_code, 3) AS code, 10 AS version
               FROM d WHERE d.icd_version = 10
               UNION ALL
               SELECT d.hadm_id, d.seq_num, {nine} AS code, {10 if s.icd_map else 9} AS version
               FROM d LEFT JOIN icd_map m ON m.root9 = left(d.icd_code, 3)
               WHERE d.icd_version = 9 AND {mapped})
        SELECT g.hadm_id, g.version,
               coalesce(t.long_title, 'ICD-' || g.version || ' ' || g.code) AS title,
               min(g.seq_num) AS first
        FROM grouped g LEFT JOIN titles t ON t.icd_code = g.code AND t.icd_version = g.version
        GROUP BY ALL""", str(paths["hosp/diagnoses_icd"]))  # fmt: skip
    if not s.icd_map and duck.rows(con, "SELECT count(*) FROM diagnoses WHERE version = 9",
                                   SOURCE)[0][0]:  # fmt: skip
        progress.say(f"{SOURCE}: no icd_map= given: ICD-9 diagnoses keep their own titles "
                     "(the pipeline converts them to ICD-10 roots)")


def _mean_items(table: str, joiner: str) -> str:
    """SQL: (stay_id, itemid, item) for `table`'s means (chart events, medications), each
    printed once and its '-0' fixed, then `joiner` and the item's label."""
    return f"""SELECT stay_id, itemid, {text.sql_zero('m')} || '{joiner}' || label AS item
        FROM (SELECT t.stay_id, t.itemid, {text.sql_printed('t.value')} AS m, i.label
              FROM {table} t JOIN items i USING (itemid))"""


def _numeric(table: str, header: str, joiner: str) -> str:
    """SQL: per stay, the sentence of `table`'s means."""
    return f"""SELECT stay_id, {text.sql_sentence(header, 'item', 'itemid')} AS sentence
        FROM ({_mean_items(table, joiner)}) GROUP BY stay_id"""


def _listed(table: str, header: str) -> str:
    """SQL: per stay, the sentence listing `table`'s items (procedures, outputs)."""
    return f"""SELECT t.stay_id, {text.sql_sentence(header, 'i.label', 't.itemid')} AS sentence
        FROM {table} t JOIN items i USING (itemid) GROUP BY t.stay_id"""


def _render_others(con) -> None:
    """Tables `meds_text`, `procs_text`, `outs_text` and `titles_text`: every sentence that does
    not need chartevents, rendered on the side connection while the chart read goes on (the
    chart read leaves part of a core idle; rendering these after it cost 0.8 s of wall clock).
    """
    rendered = {
        "meds_text": _numeric("med_means", text.MEDS_HEADER, " of "),
        "procs_text": _listed("procedures", text.PROCEDURES_HEADER),
        "outs_text": _listed("outputs", text.OUTPUTS_HEADER),
    }
    for name, sql in rendered.items():
        duck.run(con, f"CREATE TABLE {name} AS {sql}", SOURCE)
    # The titles joined by Arrow after one sort (see `text.joined`): `sql_joined('title',
    # 'first', 'title')` per admission cost about 1 CPU-s on the bench, while the chart read
    # needs both cores; the order (first seq_num, then the title) is a total one.
    titles = duck.arrow(con, f"""SELECT hadm_id, title
        FROM (SELECT hadm_id, {text.sql_words('title')} AS title, min(first) AS first
              FROM diagnoses GROUP BY ALL)
        ORDER BY hadm_id, first, title""", SOURCE)  # fmt: skip
    con.register("titles_joined", text.joined(titles, "hadm_id", "title"))
    duck.run(con, "CREATE TABLE titles_text AS SELECT hadm_id, joined AS titles "
             "FROM titles_joined", SOURCE)  # fmt: skip
    con.unregister("titles_joined")


def _chart_text(con) -> pa.Table:
    """Per stay, the chart events sentence (`stay_id`, `sentence`), joined by Arrow.

    The means are printed in DuckDB (`_mean_items`, as for `_numeric`), the rows sorted by
    stay and item, and each stay's items joined by `text.sentences`: the same text as
    `_numeric('chart_means', ...)`, whose per-stay ordered aggregate took twice the CPU time
    (chart_means has one row per stay and item, so the item order has no ties).
    """
    rows = duck.arrow(con, f"""SELECT stay_id, item FROM ({_mean_items('chart_means', ' for ')})
        ORDER BY stay_id, itemid""", SOURCE)  # fmt: skip
    return text.sentences(rows, "stay_id", "item", text.CHART_HEADER)


def _collect(con, s: Mimic4Settings) -> pa.Table:
    """One row per kept stay with its rendered sentences, ready to cache (joined in DuckDB)."""
    con.register("chart_text", _chart_text(con))  # an Arrow view, read without a copy
    diagnoses = "d.titles"
    first_section = (text.sql_demographics("k.race", "k.gender", "k.age", "k.insurance",
                                           diagnoses) if s.demographics  # fmt: skip
                     else f"'The patient is diagnosed with ' || {diagnoses} || '.'")
    sql = f"""
        SELECT CAST(k.stay_id AS VARCHAR) AS stay_id, CAST(k.label AS TINYINT) AS label,
               {first_section} AS diagnoses, chart.sentence AS chart_events,
               meds.sentence AS medications, procs.sentence AS procedures,
               outs.sentence AS outputs
        FROM kept k LEFT JOIN titles_text d ON d.hadm_id = k.hadm_id
        LEFT JOIN chart_text chart USING (stay_id) LEFT JOIN meds_text meds USING (stay_id)
        LEFT JOIN procs_text procs USING (stay_id) LEFT JOIN outs_text outs USING (stay_id)
        ORDER BY k.stay_id"""
    return duck.arrow(con, sql, SOURCE)


def load_mimic4(
    directory: Path,
    settings: Mimic4Settings | None = None,
    *,
    site: str | None = None,
    cache: str | None = None,
) -> LazyRecords:
    """Records of the pipeline's mortality cohort in a MIMIC-IV 2.2 export (see module doc)."""
    settings = settings or Mimic4Settings()
    if not directory.is_dir():
        raise FedmergeError(f"{directory}: MIMIC-IV directory not found")
    paths = _tables(directory)
    icd_map = Path(settings.icd_map).expanduser() if settings.icd_map else None
    if icd_map is not None and not icd_map.is_file():
        raise FedmergeError(f"data spec mimic4:{directory}: option 'icd_map': {icd_map} is not "
                            "a file (expected the pipeline's ICD-9 to ICD-10 mapping, TSV)")
    files = list(paths.values()) + ([icd_map] if icd_map is not None else [])
    store = cohort_cache.cache_dir(directory, cache)
    key = cohort_cache.cache_key(SOURCE, files, settings.model_dump()) if store else ""
    table = cohort_cache.read_cached(store, key)
    if table is not None:
        progress.say(f"{SOURCE}: cohort from cache {cohort_cache.cached_path(store, key)}")
        return records_from_table(table, site)
    spill = (store / "spill") if store else None
    with duck.connect(spill=spill) as con:
        table = _build(con, paths, settings, spill)
    written = cohort_cache.write_cached(store, key, table)
    if written:
        progress.say(f"{SOURCE}: cohort cached at {written}")
    return records_from_table(table, site)  # built when read: see common.data.lazy

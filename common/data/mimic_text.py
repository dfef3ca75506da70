"""The sentences of the HF Mimic4Dataset text encoding, shared by every loader that emits it.

MIMIC-IV CSV exports (`common.data.mimic4`) and MEDS event streams (`common.data.meds`) both end
as the same five sections, so a model tuned on one reads the other's text the same way:
diagnoses, the mean of each chart event and medication amount over the window, then the
procedures and outputs recorded in it (headers, `;` joins and the "mesured" spelling are the
dataset's own). Chart events and medications are the numeric sections the hard variant keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import pyarrow as pa

from common.data.duck import sql_string
from common.data.lazy import LazyRecords
from common.records import PatientRecord, Section

GENDERS = {"M": "male", "F": "female"}
SECTION_NAMES = ("diagnoses", "chart_events", "medications", "procedures", "outputs")
NUMERIC = frozenset({"chart_events", "medications"})
CHART_HEADER = "The chart events mesured are :"
MEDS_HEADER = "The mean amounts of medications administered during the episode are :"
PROCEDURES_HEADER = "The procedures performed are :"
OUTPUTS_HEADER = "The outputs collected are :"


class Demographics(NamedTuple):
    race: str
    gender: str
    age: int
    insurance: str


def format_mean(value: float) -> str:
    """Three decimals at most, trailing zeros dropped: the pipeline's rounding of the means."""
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def render(
    *,
    diagnoses: Sequence[str],
    chart: Sequence[tuple[str, float]],
    medications: Sequence[tuple[str, float]],
    procedures: Sequence[str],
    outputs: Sequence[str],
    demographics: Demographics | None = None,
) -> tuple[Section, ...]:
    """The sections in the dataset's order; an empty part has no section at all."""
    sections: list[Section] = []
    if demographics is not None:
        race, gender, age, insurance = demographics
        who = " ".join(w for w in (race, GENDERS.get(gender, gender)) if w)
        head = f"The patient {who}, {age} years old, covered by {insurance}"
        text = f"{head} was diagnosed with {';'.join(diagnoses)}." if diagnoses else f"{head}."
        sections.append(Section(name="diagnoses", text=text))
    elif diagnoses:
        text = f"The patient is diagnosed with {';'.join(diagnoses)}."
        sections.append(Section(name="diagnoses", text=text))
    if chart:
        items = ";".join(f"{format_mean(mean)} for {label}" for label, mean in chart)
        text = f"{CHART_HEADER}{items}."
        sections.append(Section(name="chart_events", text=text, numeric=True))
    if medications:
        items = ";".join(f"{format_mean(mean)} of {label}" for label, mean in medications)
        text = f"{MEDS_HEADER}{items}."
        sections.append(Section(name="medications", text=text, numeric=True))
    if procedures:
        text = f"{PROCEDURES_HEADER}{';'.join(procedures)}."
        sections.append(Section(name="procedures", text=text))
    if outputs:
        text = f"{OUTPUTS_HEADER}{';'.join(outputs)}."
        sections.append(Section(name="outputs", text=text))
    return tuple(sections)


def sections_from_texts(texts: dict[str, str | None]) -> tuple[Section, ...]:
    """Sections from already rendered sentences (SQL-rendered or cached); None = absent."""
    return tuple(
        Section(name=name, text=texts[name], numeric=name in NUMERIC)
        for name in SECTION_NAMES
        if texts.get(name)
    )


def records_from_table(table: pa.Table, site: str | None) -> LazyRecords:
    """The records of a cohort table (fresh or cached), built when read (`common.data.lazy`)."""
    return LazyRecords(table, partial(build_records, site=site), site=site)


def build_records(table: pa.Table, site: str | None) -> list[PatientRecord]:
    """PatientRecords from a cohort table: `stay_id`, `label` and one text column per section
    name (null where the stay has none)."""
    names = [name for name in SECTION_NAMES if name in table.column_names]
    texts = [table.column(name).to_pylist() for name in names]
    numeric = [name in NUMERIC for name in names]
    records = []  # built under `common.data.lazy.paused_gc`, by `LazyRecords`
    for stay_id, label, *parts in zip(table.column("stay_id").to_pylist(),
                                      table.column("label").to_pylist(), *texts,
                                      strict=True):  # fmt: skip
        sections = tuple(
            Section(name=name, text=part, numeric=flag)
            for name, part, flag in zip(names, parts, numeric, strict=True)
            if part
        )
        records.append(PatientRecord(stay_id=stay_id, site_id=site, label=label,
                                     text=" ".join(x.text for x in sections),
                                     sections=sections))  # fmt: skip
    return records


# The same sentences rendered inside DuckDB, so a cohort of tens of thousands of stays is never
# walked item by item in Python. Each function returns a SQL expression.


def sql_printed(value: str) -> str:
    """`value` with three decimals, trailing zeros and a bare point dropped ('-0' possible).

    `format('{:.3f}')` rather than `printf('%.3f')`: both are the fmt library's correctly
    rounded fixed notation (the same text on 900,000 test values, ties included), but printf
    parses its format string for every row: on the 40k-stay bench's million chart means it
    took twice the CPU time (0.62 s against 0.33 s).
    """
    return f"rtrim(rtrim(format('{{:.3f}}', {value}), '0'), '.')"


def sql_zero(printed: str) -> str:
    """`sql_printed`'s '-0' (a tiny negative mean) as '0', as `format_mean` writes it."""
    return f"(CASE WHEN {printed} = '-0' THEN '0' ELSE {printed} END)"


def sql_mean(value: str) -> str:
    """`format_mean` in SQL: three decimals, trailing zeros and a bare point dropped."""
    return sql_zero(sql_printed(value))


def sql_avg(value: str) -> str:
    """An aggregate: the mean of `value`, the same on every run.

    DuckDB's `avg` of DOUBLEs adds in whatever order its threads finish, so a mean on a
    rounding tie printed 123.637 on one run and 123.638 on the next (stay 18862 of the bench).
    Each value is taken at 10 decimals (a chart value has a few; a bucket mean is rounded
    there) and summed exactly as a DECIMAL; the one division is then correctly rounded, so
    the mean is the exact mean of those values, whatever the order (a test checks it against
    fractions).
    """
    return f"avg(CAST({value} AS DECIMAL(38, 10)))"


def sql_words(value: str) -> str:
    """Whitespace runs collapsed to one space, ends trimmed (Python's `' '.join(s.split())`)."""
    return f"trim(regexp_replace(coalesce({value}, ''), '\\s+', ' ', 'g'))"


def sql_joined(items: str, *order: str) -> str:
    """An aggregate: `items` joined by ';' in the order of the `order` expressions.

    The same text as `string_agg(items, ';' ORDER BY order...)`, whose ordered aggregate goes
    through DuckDB's general sorter; collecting (order keys, item) structs unordered and
    sorting each stay's short list was somewhat faster on the 40k-stay bench's million chart
    means (2.0 s against 2.25 s, three alternating runs each on a shared 2-core machine; the
    diagnosis titles: no difference). Most of the chart sentence's time is printing the means.
    Equal keys are ordered by the item itself, so the text never depends on thread timing;
    NULL items are skipped and NULL keys sort last, as in string_agg.
    """
    keys = ", ".join(f"k{i} := {expr}" for i, expr in enumerate(order))
    pairs = f"list(struct_pack({keys}, v := {items}))"
    joined = f"array_to_string(list_transform(list_sort({pairs}), lambda x: x.v), ';')"
    return f"(CASE WHEN count({items}) = 0 THEN NULL ELSE {joined} END)"  # string_agg's NULL


def joined(rows: pa.Table, key: str, item: str) -> pa.Table:
    """Per run of equal `key`, that run's `item`s joined by ';': columns `key`, `joined`.

    `rows` come sorted by key, then by each key's item order (an `ORDER BY key, order...`
    query), so each key's text is what `sql_joined(item, order...)` gives when the order
    (with the item itself last, as `sql_joined` breaks ties) is a total one. Why not in SQL:
    the grouped, ordered aggregate built and sorted a list of structs per key; one sort of
    the rows and Arrow's vectorized join took half the CPU time on the 40k-stay bench's
    million chart means (1.05 s against 2.1 s). `item` must hold no null; each key is
    returned once, in order.
    """
    import numpy as np
    import pyarrow.compute as pc  # not at import: a cached load never renders (see cohort_cache)

    keys = rows.column(key).to_numpy()
    if not len(keys):
        return pa.table({key: rows.column(key), "joined": pa.array([], pa.string())})
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    offsets = pa.array(np.r_[starts, len(keys)].astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, rows.column(item).combine_chunks())
    return pa.table({key: pa.array(keys[starts]), "joined": pc.binary_join(lists, ";")})


def sentences(rows: pa.Table, key: str, item: str, header: str) -> pa.Table:
    """`joined`, as sentences: `header` + the items + '.' (columns `key`, `sentence`); the
    text of `sql_sentence(header, item, order)` under `joined`'s conditions."""
    import pyarrow.compute as pc

    table = joined(rows, key, item)
    text = pc.binary_join_element_wise(header, table.column("joined"), ".", "")
    return pa.table({key: table.column(key), "sentence": text})


def sql_sentence(header: str, items: str, order: str) -> str:
    """An aggregate: `header` + items joined by ';' in `order` + '.'."""
    return f"{sql_string(header)} || {sql_joined(items, order)} || '.'"


def sql_demographics(race: str, gender: str, age: str, insurance: str, diagnoses: str) -> str:
    """The demographic diagnoses sentence of `render(..., demographics=...)`."""
    word = f"(CASE {gender} WHEN 'M' THEN 'male' WHEN 'F' THEN 'female' ELSE {gender} END)"
    who = f"concat_ws(' ', nullif({sql_words(race)}, ''), nullif({sql_words(word)}, ''))"
    head = (f"'The patient ' || {who} || ', ' || CAST({age} AS VARCHAR) || "
            f"' years old, covered by ' || {sql_words(insurance)}")  # fmt: skip
    return (f"({head} || CASE WHEN {diagnoses} IS NULL THEN '.' "
            f"ELSE ' was diagnosed with ' || {diagnoses} || '.' END)")  # fmt: skip

"""MEDS input: a dataset written here in the standard's own schemas (meds 0.4), loaded into the
same text sections as the MIMIC-IV loader, split over sites, and tuned on by `simulate`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import meds
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.data import load_records
from common.data.splits import split_records
from common.errors import FedmergeError

HR, TEMP, ODD = "LAB//220045//bpm", "LAB//223761//°F", "LAB//999//mg"
NOREPI, VENT = "MEDICATION//Norepinephrine", "PROCEDURE//225792"
FOLEY = "SUBJECT_FLUID_OUTPUT//226559"
SEPSIS = "DIAGNOSIS//ICD//10//A41"
DESCRIPTIONS = {HR: "Heart Rate", TEMP: "Temperature Fahrenheit", NOREPI: "Norepinephrine",
                VENT: "Invasive Ventilation", FOLEY: "Foley", SEPSIS: "Other sepsis"}  # fmt: skip
T0 = datetime(2150, 1, 1)
PREDICT_1 = datetime(2150, 1, 3)
FILLERS = range(3, 27)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


# Subject 1, predicted at hour 48: the window is (hour 0, hour 48].
SUBJECT_1 = [
    (None, "GENDER//F", None),  # static: not in any section
    (at(-1), HR, 900.0),  # before the window
    (at(2), SEPSIS, None),
    (at(3), HR, 100.0),
    (at(27), HR, 110.0),
    (at(29), TEMP, 98.6),
    (at(48), HR, 120.0),  # at the prediction time: included
    (at(49), HR, 500.0),  # after it: never
    (at(4), NOREPI, 2.0),
    (at(6), NOREPI, 4.0),
    (at(5), VENT, None),
    (at(6), FOLEY, 300.0),
    (at(7), "LAB//50912", None),  # a text-only lab: no number to average
    (at(24), "TRANSFER_TO//ICU", None),
    (at(72), meds.death_code, None),
]
EXPECTED_1 = (
    "The patient is diagnosed with Other sepsis. The chart events mesured are :110 for Heart "
    "Rate;98.6 for Temperature Fahrenheit. The mean amounts of medications administered during "
    "the episode are :3 of Norepinephrine. The procedures performed are :Invasive Ventilation. "
    "The outputs collected are :Foley."
)


def write_meds(root: Path) -> Path:
    """data/ in two shards, metadata/codes.parquet and labels/, all in the MEDS schemas."""
    rows = [(1, t, c, v) for t, c, v in SUBJECT_1]
    rows += [(2, at(1), ODD, 1.23456), (2, at(30), HR, 80.0)]
    rows += [(s, at(10), HR, 60.0 + s) for s in FILLERS]
    data_schema = meds.DataSchema.schema()
    for shard, part in (("train", [r for r in rows if r[0] % 2]),
                        ("held_out", [r for r in rows if not r[0] % 2])):  # fmt: skip
        table = pa.table(
            {
                "subject_id": [r[0] for r in part], "time": [r[1] for r in part],
                "code": [r[2] for r in part], "numeric_value": [r[3] for r in part],
                "text_value": [None] * len(part),
            },
            schema=data_schema,
        )  # fmt: skip
        (root / "data" / shard).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / shard / "0.parquet")
    codes = pa.table(
        {"code": list(DESCRIPTIONS), "description": list(DESCRIPTIONS.values()),
         "parent_codes": [[] for _ in DESCRIPTIONS]},
        schema=meds.CodeMetadataSchema.schema(),
    )  # fmt: skip
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(codes, root / "metadata" / "codes.parquet")
    labels = [(1, PREDICT_1, True), (2, at(24), False), (2, at(48), True)]
    labels += [(s, at(20), s % 3 == 0) for s in FILLERS]
    write_labels(root / "labels" / "mortality.parquet", labels)
    return root


def write_labels(path: Path, labels: list[tuple[int, datetime, bool]]) -> None:
    table = pa.table(
        {"subject_id": [r[0] for r in labels], "prediction_time": [r[1] for r in labels],
         "boolean_value": [r[2] for r in labels], "integer_value": [None] * len(labels),
         "float_value": [None] * len(labels), "categorical_value": [None] * len(labels)},
        schema=meds.LabelSchema.schema(),
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def meds_dir(tmp_path_factory) -> Path:
    return write_meds(tmp_path_factory.mktemp("meds"))


def test_sections_window_and_labels(meds_dir):
    records = {r.stay_id: r for r in load_records(f"meds:{meds_dir}?site=icu")}
    assert len(records) == 2 + 1 + len(FILLERS)
    one = records["1"]
    assert (one.label, one.text, one.site_id) == (1, EXPECTED_1, "icu")
    assert [s.name for s in one.sections] == [
        "diagnoses", "chart_events", "medications", "procedures", "outputs"
    ]
    # Subject 2 has two labels: one record each, keyed by prediction time; each sees its own
    # window (the heart rate at hour 30 is after the first prediction time).
    first, second = records["2@2150-01-02T00:00:00"], records["2@2150-01-03T00:00:00"]
    assert (first.label, first.text) == (0, "The chart events mesured are :1.235 for LAB//999//mg.")
    assert second.text == (
        "The chart events mesured are :80 for Heart Rate;1.235 for LAB//999//mg."
    )
    assert records["6"].label == 1 and records["7"].label == 0
    assert records["7"].text == "The chart events mesured are :67 for Heart Rate."


def test_window_length_and_hard_variant(meds_dir):
    short = {r.stay_id: r.text for r in load_records(f"meds:{meds_dir}?hours=1&cache=off")}
    assert short["1"] == "The chart events mesured are :120 for Heart Rate."
    hard = {r.stay_id: r.text for r in load_records(f"meds:{meds_dir}", hard=True)}
    assert hard["1"] == (
        "The chart events mesured are :110 for Heart Rate;98.6 for Temperature Fahrenheit. "
        "The mean amounts of medications administered during the episode are :3 of "
        "Norepinephrine."
    )


def test_labels_option_and_split_over_sites(meds_dir, tmp_path):
    other = tmp_path / "task.parquet"
    write_labels(other, [(s, at(20), s % 2 == 0) for s in FILLERS])
    records = load_records(f"meds:{meds_dir}?labels={other}&cache=off")
    assert [r.label for r in records] == [int(s % 2 == 0) for s in FILLERS]
    _, sites = split_records(records, "label", sites=3, seed=0)
    assert sorted(r.stay_id for site in sites for r in site) == sorted(r.stay_id for r in records)
    assert all(any(r.label for r in site) and not all(r.label for r in site) for site in sites)


def _damaged(meds_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = Path(shutil.copytree(meds_dir, tmp_path / "meds"))
    shutil.rmtree(copy / ".fedmerge-cache", ignore_errors=True)
    return copy


def test_bad_input_is_one_clear_error(meds_dir, tmp_path):
    copy = _damaged(meds_dir, tmp_path)
    with pytest.raises(FedmergeError, match=r"absent: MEDS label table not found"):
        load_records(f"meds:{copy}?labels=absent")
    write_labels(copy / "labels" / "mortality.parquet", [(1, PREDICT_1, True), (404, at(5), False)])
    with pytest.raises(FedmergeError, match=r"mortality\.parquet: MEDS label table: column "
                       r"'subject_id': subject 404 has no events in"):  # fmt: skip
        load_records(f"meds:{copy}?labels=labels/mortality.parquet")
    shard = copy / "data" / "train" / "0.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.set_column(1, "time", table.column("time").cast(pa.string())), shard)
    with pytest.raises(FedmergeError, match=r"train/0\.parquet: MEDS data table: column 'time' "
                       r"is string, expected timestamp"):  # fmt: skip
        load_records(f"meds:{copy}?labels=labels/mortality.parquet")
    pq.write_table(table.drop_columns(["code"]), shard)
    with pytest.raises(FedmergeError, match=r"0\.parquet: MEDS data table: missing column 'code'"):
        load_records(f"meds:{copy}")
    for path in (copy / "data").rglob("*.parquet"):
        path.unlink()
    with pytest.raises(FedmergeError, match=r"data: MEDS data table not found"):
        load_records(f"meds:{copy}")


@pytest.mark.slow
def test_simulate_tunes_on_meds_sites(meds_dir, tiny_parents, tmp_path):
    from simulation.runner import run_simulation

    lenient = {"min-cohort": 1, "min-positives": 0}
    result = run_simulation(
        data=f"meds:{meds_dir}", split="iid", sites=3, parents=tiny_parents,
        out=tmp_path / "run",
        recipe_fields={"search": {"grid_points": 2}, "histogram": {"bins": 64},
                       "scoring": {"max_patient_tokens": 32}, "secagg": {"timeout": 60.0}},
        node_overrides={i: lenient for i in range(3)},
    )  # fmt: skip
    report = json.loads((result.out / "report.json").read_text())
    assert [t["lambda"] for t in report["tune"]] == [0.0, 1.0]
    assert sum(t["n"] for t in report["tune"][:1]) > 0

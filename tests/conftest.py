"""Shared fixtures: tiny real checkpoints built offline, and an offline environment."""

from __future__ import annotations

import os

from common.flower_runtime import OFFLINE_ENV, set_offline_defaults

# Set before anything imports transformers or flwr: nothing may reach a network.
set_offline_defaults()
assert all(os.environ[k] for k in OFFLINE_ENV)  # HF_HUB_OFFLINE, FLWR_TELEMETRY_ENABLED, ...

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
EICU_DEMO = SHARED / "data" / "eicu-demo"



@pytest.fixture(scope="session", autouse=True)
def _cohort_cache_outside_the_data(tmp_path_factory):
    """Loaders cache cohorts next to the export by default; tests must not write into shared
    data (the eICU demo), so their default cache lives in a session temporary directory."""
    previous = os.environ.get("FEDMERGE_CACHE_DIR")
    os.environ["FEDMERGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cohort-cache"))
    yield
    if previous is None:
        os.environ.pop("FEDMERGE_CACHE_DIR", None)
    else:
        os.environ["FEDMERGE_CACHE_DIR"] = previous


# A few sentences in the shape of patient text, so the word-level vocabulary covers it.
TOKENIZER_CORPUS = [
    "The patient is diagnosed with sepsis ; acute kidney failure ; pneumonia ; heart failure .",
    "The chart events mesured are : 98.6 for Temperature ; 112 for Heart Rate ; 7.31 for pH .",
    "The mean amounts of medications administered during the episode are : 4 of Norepinephrine .",
    "The procedures performed are : Ventilation ; Dialysis . The outputs collected are : Urine .",
    "The patient White male , 67 years old , covered by Medicare was diagnosed with shock .",
    "age gender female male region hospital unit admission diagnosis APACHE creatinine sodium",
    "glucose lactate bilirubin platelets wbc hemoglobin respiratory rate blood pressure mmHg",
    "mg/dL mEq/L bpm breaths per minute Celsius insulin heparin vancomycin propofol fentanyl",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from common.tiny_models import train_word_tokenizer

    return train_word_tokenizer(TOKENIZER_CORPUS)


@pytest.fixture(scope="session")
def tiny_parents(tmp_path_factory, tiny_tokenizer) -> tuple[Path, Path]:
    """Two tiny Llamas of one architecture: parent A single-file, parent B sharded."""
    from common.tiny_models import build_tiny_llama

    root = tmp_path_factory.mktemp("parents")
    a = build_tiny_llama(root / "parent_a", tiny_tokenizer, seed=1)
    b = build_tiny_llama(root / "parent_b", tiny_tokenizer, seed=2, max_shard_size="60KB")
    return a, b


@pytest.fixture(scope="session")
def eicu_demo_dir() -> Path:
    if not (EICU_DEMO / "patient.csv.gz").exists():
        pytest.skip(
            f"eICU demo not found at {EICU_DEMO}: these tests read ../shared/data/eicu-demo"
        )
    return EICU_DEMO


@pytest.fixture(autouse=True)
def _fresh_announcement_rate():
    """Each test starts with no announcements counted against the nodes' hourly cap (the
    suite sends many more in one process than a real node would see)."""
    from client.client_app import _ANNOUNCEMENTS

    _ANNOUNCEMENTS.reset()
    yield

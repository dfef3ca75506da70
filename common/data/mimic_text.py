"""The sentences of the HF Mimic4Dataset text encoding, shared by every loader that emits it.

MIMIC-IV CSV exports (`common.data.mimic4`) and MEDS event streams (`common.data.meds`) both end
as the same five sections, so a model tuned on one reads the other's text the same way:
diagnoses, the mean of each chart event and medication amount over the window, then the
procedures and outputs recorded in it (headers, `;` joins and the "mesured" spelling are the
dataset's own). Chart events and medications are the numeric sections the hard variant keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from common.records import Section

GENDERS = {"M": "male", "F": "female"}


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
        text = f"The chart events mesured are :{items}."
        sections.append(Section(name="chart_events", text=text, numeric=True))
    if medications:
        items = ";".join(f"{format_mean(mean)} of {label}" for label, mean in medications)
        text = f"The mean amounts of medications administered during the episode are :{items}."
        sections.append(Section(name="medications", text=text, numeric=True))
    if procedures:
        text = f"The procedures performed are :{';'.join(procedures)}."
        sections.append(Section(name="procedures", text=text))
    if outputs:
        text = f"The outputs collected are :{';'.join(outputs)}."
        sections.append(Section(name="outputs", text=text))
    return tuple(sections)

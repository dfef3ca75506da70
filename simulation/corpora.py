"""The public synthetic corpora the demo parents learn from; no site's data is ever used.

Like PatientDx's instruct and math parents, each demo parent should know part of what predicts
death and nothing of the rest, so that only a merge knows both:
- `numeric`: stays rendered as the sites' texts are, labelled "yes" when the chart events show a
  physiologically unstable patient (vitals and labs far outside their reference ranges);
  diagnoses and treatments are drawn independently of that label, so they carry no signal.
- `clinical`: the reverse: labelled "yes" when the diagnoses and treatments indicate a
  life-threatening condition or critical care, with chart events independent of the label.
Both are drawn from their own random streams (domain tags distinct from the cohort's), so no
corpus example shares a seed, or a text, with any site's cohort.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from common.data.synthetic import (
    COHORT_STREAM,
    COMORBIDITIES,
    CONDITIONS,
    LABS,
    MEDICATIONS,
    MEDS_HEADER,
    OUTPUTS,
    PROCEDURES,
    VITALS,
    render_sections,
    render_text,
    sample_stay,
    stream,
)

NUMERIC_STREAM = 0xA11CE
CLINICAL_STREAM = 0xB0B
PRETRAIN_STREAM = 0xBA5E
assert len({NUMERIC_STREAM, CLINICAL_STREAM, PRETRAIN_STREAM, COHORT_STREAM}) == 4
CORPUS_SEED = 1

# Thresholds near each score's median under the corpus draw, so the labels are balanced.
UNSTABLE_ABOVE = 1.0
CRITICAL_ABOVE = 2.2

Task = Literal["numeric", "clinical"]


class CorpusExample(BaseModel):
    """One training example: the patient text and the proxy yes/no answer for its task."""

    model_config = ConfigDict(frozen=True)

    task: Task
    text: str
    label: Literal[0, 1]


def _label(task: Task, stay) -> int:
    if task == "numeric":
        return int(stay.physiology > UNSTABLE_ABOVE)
    return int(stay.clinical > CRITICAL_ABOVE)


def corpus(task: Task, n: int, *, seed: int = CORPUS_SEED) -> list[CorpusExample]:
    """`n` examples for `task`; physiology and clinical severity are drawn independently."""
    tag = NUMERIC_STREAM if task == "numeric" else CLINICAL_STREAM
    rng = stream(tag, seed)
    out = []
    for _ in range(n):
        stay = sample_stay(rng, physiology=1.2 * rng.normal(), clinical=1.2 * rng.normal())
        out.append(
            CorpusExample(
                task=task, text=render_text(render_sections(stay)), label=_label(task, stay)
            )
        )
    return out


def pretraining_texts(n: int, *, seed: int = CORPUS_SEED) -> list[str]:
    """Unlabelled texts in the same encoding, for the base model's language modelling."""
    rng = stream(PRETRAIN_STREAM, seed)
    return [
        render_text(render_sections(sample_stay(rng, physiology=1.2 * rng.normal())))
        for _ in range(n)
    ]


def vocabulary_text() -> str:
    """Every word the encoding can produce, so a tokenizer trained on a sample misses none."""
    words = [m.label for m in (*VITALS, *LABS)]
    words += [name for options in CONDITIONS.values() for name, _ in options]
    words += [name for name, _ in COMORBIDITIES] + [name for name, *_ in MEDICATIONS]
    words += [name for name, _ in PROCEDURES] + list(OUTPUTS)
    words += [MEDS_HEADER, "The patient male female years old is diagnosed with for of . ; : ,"]
    words += ["The chart events mesured are : The procedures performed are : The outputs collected"]
    return " ".join(words)

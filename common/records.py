"""The patient record every loader produces and every scorer consumes.

One shape for all sources (serialized text, MIMIC-IV tables, eICU, the synthetic cohort) keeps
the hospital node independent of where its data came from.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A rendered part of the patient text; `numeric` marks what the hard variant keeps."""

    model_config = ConfigDict(frozen=True)

    name: str
    text: str
    numeric: bool = False


class PatientRecord(BaseModel):
    """One ICU stay with its binary outcome and the text a model reads."""

    model_config = ConfigDict(frozen=True)

    stay_id: str = Field(min_length=1)
    site_id: str | None = None
    label: Literal[0, 1]
    text: str
    sections: tuple[Section, ...] = ()

    def hard(self) -> PatientRecord:
        """The Mortality-hard view: only the numeric sections, as in PatientDx."""
        if not self.sections:
            raise ValueError(
                f"stay {self.stay_id}: the hard variant needs structured sections, "
                "but this record was loaded from plain text"
            )
        kept = tuple(s for s in self.sections if s.numeric)
        return self.model_copy(update={"text": " ".join(s.text for s in kept), "sections": kept})

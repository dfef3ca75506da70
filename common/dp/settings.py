"""The privacy terms of a run, as the coordinator announces them and every site checks them.

Neighbouring relation: two cohorts that differ by one patient (added or removed) at one site.
A patient lies in exactly one fold, and in each candidate's histogram pair that patient is one
count in one bin, so each candidate's release has L2 (and L1) sensitivity 1, and a run that
releases at most `releases` candidates per fold composes `releases` such mechanisms for any one
patient (the tuning and the test fold hold different patients: parallel composition).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PrivacyMode = Literal["off", "distributed", "local"]
# Stronger modes protect against more: a site refuses a run in a mode below what it requires.
MODE_STRENGTH = {"off": 0, "distributed": 1, "local": 2}
DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-6


class PrivacySettings(BaseModel):
    """`off`: exact sums. `local`: each site's own release is (ε, δ)-DP by itself, so a
    coordinator that isolates one site still sees only a DP release. `distributed`: each site
    adds a 1/`honest_sites` share of the noise, so the SUM is (ε, δ)-DP whenever at least
    `honest_sites` of the summed sites follow the protocol (much less noise per site).

    `epsilon` and `delta` bound the whole run for any one patient; `releases` is the most
    candidate releases of one fold the run may make (the recipe computes it from the search).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: PrivacyMode = "off"
    epsilon: float = Field(default=DEFAULT_EPSILON, gt=0, le=64)
    delta: float = Field(default=DEFAULT_DELTA, gt=0, le=1e-3)
    releases: int = Field(default=1, ge=1, le=10_000)
    honest_sites: int = Field(default=1, ge=1, le=10_000)

    @model_validator(mode="after")
    def _valid(self) -> PrivacySettings:
        if self.mode == "local" and self.honest_sites != 1:
            raise ValueError("privacy.honest_sites: local mode assumes no honest peer; expected 1")
        return self

    @property
    def on(self) -> bool:
        return self.mode != "off"

"""The coordinator's tuning recipe: what to merge, how to search λ, and how to aggregate.

Every site must score the same merges with the same prompt and the same bins, or the summed
histograms mean nothing; the recipe is therefore one validated object whose fingerprint each
site accepts at the announcement and checks again in every round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.dp.settings import DEFAULT_DELTA, DEFAULT_EPSILON, PrivacyMode, PrivacySettings
from common.errors import FedmergeError, validation_error
from common.metrics import HistogramSpec, default_histogram
from common.protocol import (
    GROUPS,
    PROTOCOL_VERSION,
    Announcement,
    Candidate,
    RoundInstructions,
    ScoringSettings,
)


class SearchSettings(BaseModel):
    """`grid`: evenly spaced points (paper parity). `adaptive`: `coarse_points` cell centres,
    then best ± step/2 per round, halving the step, until it is below `tolerance` (a λ step)
    or `max_rounds` refinement rounds are spent. The defaults cost 5 evaluations."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Bounded: every point is a full scoring pass at every site (a site's policy caps
    # candidates per round at max_candidates, 32 by default, at most 1024).
    strategy: Literal["grid", "adaptive"] = "grid"
    grid_points: int = Field(default=11, ge=2, le=101)
    coarse_points: int = Field(default=3, ge=2, le=33)
    tolerance: float = Field(default=0.1, gt=0, le=0.5)
    max_rounds: int = Field(default=4, ge=0, le=100)
    max_candidates_per_round: int = Field(default=11, ge=1, le=1024)


class SecAggSettings(BaseModel):
    """SecAgg+ shares and threshold (an int is a count, a float a fraction of the sites), and
    the timeout of each SecAgg+ stage. Scoring happens before the exchange, so a stage only
    moves keys, shares and masked vectors: seconds, whatever the model's size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    timeout: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _valid(self) -> SecAggSettings:
        if isinstance(self.num_shares, int) and self.num_shares <= 2:
            raise ValueError(f"num_shares={self.num_shares}: as an integer it must exceed 2")
        if isinstance(self.num_shares, float) and not 0 < self.num_shares <= 1:
            raise ValueError(f"num_shares={self.num_shares}: as a fraction it must be in (0, 1]")
        t = self.reconstruction_threshold
        if isinstance(t, float) and not 0.5 < t <= 1:
            raise ValueError(f"reconstruction_threshold={t}: as a fraction it must be in (0.5, 1]")
        if isinstance(t, int) and isinstance(self.num_shares, int) and t >= self.num_shares:
            raise ValueError(f"reconstruction_threshold={t}: must be below num_shares")
        return self

    def shares_for(self, sites: int) -> int:
        """Shares per site for `sites` sampled sites: odd unless it is every site (Flower
        1.41 hands out one share too few for an even count below the site count)."""
        shares = (
            self.num_shares if isinstance(self.num_shares, int) else round(self.num_shares * sites)
        )
        shares = min(max(shares, 3), sites)
        if shares < sites and shares % 2 == 0:
            shares += 1
        return shares

    def threshold_for(self, sites: int, min_sites: int = 3) -> int:
        """The threshold for `sites` sampled sites: the recipe's, raised to what every site's
        guard demands by default (a strict majority of the sampled sites, at least
        `min_sites`), so that no coalition smaller than that can unmask anything."""
        shares = self.shares_for(sites)
        t = self.reconstruction_threshold
        wanted = round(t * shares) if isinstance(t, float) else t
        threshold = max(wanted, sites // 2 + 1, min_sites, 2)
        if threshold > shares:
            raise FedmergeError(
                f"secagg: threshold {threshold} for {sites} sites exceeds {shares} shares per "
                "site; expected num_shares of at least a strict majority of the sites"
            )
        return threshold


class PrivacyRecipe(BaseModel):
    """Differential privacy of the run's releases (README "Privacy model"): `distributed`
    (the default: each site adds a share of the noise, the sum is (ε, δ)-DP while a SecAgg+
    threshold of sites is honest), `local` (each site's own release is DP) or `off` (exact
    sums; sites whose policy requires DP refuse). ε and δ bound the whole run per patient."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: PrivacyMode = "distributed"
    epsilon: float = Field(default=DEFAULT_EPSILON, gt=0, le=64)
    delta: float = Field(default=DEFAULT_DELTA, gt=0, le=1e-3)


class TuningRecipe(BaseModel):
    """Everything the coordinator needs for one federated λ search. Strict: an unknown key
    (`lambda`, `search.grid_point`, `secagg.timout`) is an error, never a silent default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    parent_a: str = Field(min_length=1)
    parent_b: str = Field(min_length=1)
    fingerprint_a: str | None = None
    fingerprint_b: str | None = None
    method: Literal["slerp", "linear"] = "slerp"
    # None: one λ for the whole model; else one λ per listed parameter group.
    groups: tuple[Literal["attention", "mlp", "other"], ...] | None = None
    search: SearchSettings = SearchSettings()
    folds: Literal[2] = 2
    fold_seed: int = 0
    tune_fold: int = 0
    test_fold: int = 1
    # Two sites would each learn the other's histograms from the sum.
    min_sites: int = Field(default=3, ge=3)
    secagg: SecAggSettings = SecAggSettings()
    # Seconds one site may take to score ONE candidate (None: from the parents' size, see
    # `default_score_timeout`). A site slower than this is left out of that round.
    score_timeout: float | None = Field(default=None, gt=0, le=7 * 86_400)
    # None: the federation's default for the privacy mode (`histogram_spec`).
    histogram: HistogramSpec | None = None
    scoring: ScoringSettings = ScoringSettings()
    privacy: PrivacyRecipe = PrivacyRecipe()

    @model_validator(mode="after")
    def _valid(self) -> TuningRecipe:
        if self.groups is not None and (
            not self.groups or len(set(self.groups)) != len(self.groups)
        ):
            raise ValueError(f"groups={self.groups}: expected distinct names from {GROUPS}")
        if self.tune_fold == self.test_fold or not (
            0 <= self.tune_fold < self.folds and 0 <= self.test_fold < self.folds
        ):
            raise ValueError("tune_fold and test_fold must be different folds in [0, folds)")
        return self

    def with_fingerprints(self) -> TuningRecipe:
        """Fill missing parent fingerprints from the coordinator's own copies of the parents."""
        if self.fingerprint_a and self.fingerprint_b:
            return self
        from common.model_io import fingerprint, require_checkpoint

        fps = [
            fingerprint(require_checkpoint(path, f"recipe: {label} (or give fingerprint_{ab})"))
            for label, ab, path in (
                ("parent_a", "a", self.parent_a),
                ("parent_b", "b", self.parent_b),
            )
        ]
        return self.model_copy(
            update={
                "fingerprint_a": self.fingerprint_a or fps[0],
                "fingerprint_b": self.fingerprint_b or fps[1],
            }
        )

    @property
    def parent_fingerprints(self) -> tuple[str, str]:
        if not (self.fingerprint_a and self.fingerprint_b):
            raise FedmergeError("recipe: parent fingerprints are not set; call with_fingerprints()")
        return self.fingerprint_a, self.fingerprint_b

    @property
    def histogram_spec(self) -> HistogramSpec:
        """The bins the run releases: the recipe's, else 32 reference bins for exact sums and
        8 with noise (`common.metrics.default_histogram`)."""
        return self.histogram or default_histogram(self.privacy.mode != "off")

    def fingerprint(self) -> str:
        """SHA-256 of everything that changes what sites compute (not paths, not timeouts)."""
        payload = self.model_dump_json(
            exclude={"parent_a", "parent_b", "secagg", "score_timeout"}, round_trip=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()

    def scoring_timeout(self) -> float:
        """Seconds per candidate per site: the recipe's, else sized from the parents."""
        if self.score_timeout is not None:
            return self.score_timeout
        return default_score_timeout(Path(self.parent_a))

    def max_releases(self) -> int:
        """The most candidates one fold can be released for in a run: the whole tuning
        search (the test round's three candidates use the other fold)."""
        s = self.search
        g = len(self.groups) if self.groups else 1
        if s.strategy == "grid":
            tune = s.grid_points**g
        else:
            tune = s.coarse_points**g + s.max_rounds * 2 * g
        return max(tune, 3)

    def privacy_terms(self, announced_sites: int) -> PrivacySettings:
        """The run's privacy as announced: fixed at the announcement for every round. The
        distributed noise assumes a strict majority of the announced sites is honest, which
        is also the least a SecAgg+ round must sum (its threshold is raised to it, and sites
        refuse smaller sums)."""
        p = self.privacy
        honest = announced_sites // 2 + 1 if p.mode == "distributed" else 1
        return PrivacySettings(
            mode=p.mode, epsilon=p.epsilon, delta=p.delta, releases=self.max_releases(),
            honest_sites=honest,
        )

    def terms(self, announced_sites: int) -> dict[str, object]:
        """The fields every message of a run restates (`common.protocol.RecipeTerms`)."""
        return {
            "protocol": PROTOCOL_VERSION,
            "recipe_fingerprint": self.fingerprint(),
            "parent_fingerprints": self.parent_fingerprints,
            "method": self.method,
            "folds": self.folds,
            "fold_seed": self.fold_seed,
            "scoring": self.scoring,
            "privacy": self.privacy_terms(announced_sites),
        }

    def announcement(self, sites: int) -> Announcement:
        """What the sites check their policy against before any round."""
        return Announcement(
            **self.terms(sites),
            sites=sites,
            max_candidates_per_round=self.search.max_candidates_per_round,
            score_folds=(self.tune_fold, self.test_fold),
            histogram=self.histogram_spec,
        )

    def round_instructions(
        self, *, round: int, stage: Literal["tune", "test"], candidates: list[Candidate],
        sites: int, announced_sites: int | None = None,
    ) -> RoundInstructions:
        """One round's instructions: the recipe's terms (as announced to `announced_sites`)
        plus the round's candidates and fold."""
        return RoundInstructions(
            **self.terms(announced_sites if announced_sites is not None else sites),
            round=round,
            stage=stage,
            candidates=candidates,
            fold=self.tune_fold if stage == "tune" else self.test_fold,
            histogram=self.histogram_spec,
            sites=sites,
        )

    def parent_candidate(self, which: Literal[0, 1]):
        """λ = 0 (parent A) or λ = 1 (parent B) in this recipe's candidate shape."""
        if self.groups is None:
            return float(which)
        return {g: float(which) for g in self.groups}


def default_score_timeout(parent: Path) -> float:
    """A generous per-candidate scoring time for a parent of this size: 2 minutes plus 10
    minutes per GB of weights (a 7-8 B model in bf16, about 15 GB, gets 2.5 hours), or an
    hour when the coordinator holds no copy of the parents to measure."""
    from common.model_io import weight_files

    try:
        size = sum(f.stat().st_size for f in weight_files(parent))
    except (OSError, ValueError, FedmergeError):
        size = 0
    if size == 0:
        return 3600.0
    return 120.0 + 600.0 * size / 1e9


# `[tool.flwr.app.config]` / `--run-config` keys -> recipe fields (flat, Flower-friendly).
RUN_KEYS = {
    "parent-a": ("parent_a",),
    "parent-b": ("parent_b",),
    # Announced to the sites; when given, the coordinator needs no copy of the parents.
    "fingerprint-a": ("fingerprint_a",),
    "fingerprint-b": ("fingerprint_b",),
    "method": ("method",),
    "groups": ("groups",),
    "search": ("search", "strategy"),
    "grid-points": ("search", "grid_points"),
    "coarse-points": ("search", "coarse_points"),
    "tolerance": ("search", "tolerance"),
    "max-rounds": ("search", "max_rounds"),
    "max-candidates-per-round": ("search", "max_candidates_per_round"),
    "fold-seed": ("fold_seed",),
    "tune-fold": ("tune_fold",),
    "test-fold": ("test_fold",),
    "min-sites": ("min_sites",),
    "num-shares": ("secagg", "num_shares"),
    "reconstruction-threshold": ("secagg", "reconstruction_threshold"),
    "timeout": ("secagg", "timeout"),
    "score-timeout": ("score_timeout",),
    "bins": ("histogram", "bins"),
    "lo": ("histogram", "lo"),
    "hi": ("histogram", "hi"),
    "template": ("scoring", "template"),
    "use-chat-template": ("scoring", "use_chat_template"),
    "max-patient-tokens": ("scoring", "max_patient_tokens"),
    "batch-tokens": ("scoring", "batch_tokens"),
    "hard": ("scoring", "hard"),
    "bin-placement": ("histogram", "placement"),
    "bin-reference": ("histogram", "reference"),
    "privacy": ("privacy", "mode"),
    "epsilon": ("privacy", "epsilon"),
    "delta": ("privacy", "delta"),
}
# Run-config keys the apps read elsewhere (simulation data, output directory).
OTHER_RUN_KEYS = {"data", "split", "split-seed", "out", "sites"}


def recipe_from_run_config(
    run_config: Mapping[str, object],
    *,
    source: str = "run config",
    default_parents: tuple[Path, Path] | None = None,
) -> TuningRecipe:
    """Build a recipe from Flower's flat run config; empty parents mean `default_parents`
    (the caller's choice: `flwr run .` passes the demo pair)."""
    fields: dict[str, dict | object] = {}
    for key, value in run_config.items():
        if key in OTHER_RUN_KEYS:
            continue
        if key not in RUN_KEYS:
            raise FedmergeError(
                f"{source}: unknown key '{key}' (expected one of "
                f"{', '.join(sorted([*RUN_KEYS, *OTHER_RUN_KEYS]))})"
            )
        if value == "":
            continue  # empty string = keep the default
        path = RUN_KEYS[key]
        if key == "groups":
            value = tuple(v.strip() for v in str(value).split(",") if v.strip()) or None
        if len(path) == 1:
            fields[path[0]] = value
        else:
            fields.setdefault(path[0], {})[path[1]] = value  # type: ignore[index]
    if ("parent_a" not in fields or "parent_b" not in fields) and default_parents is not None:
        fields.setdefault("parent_a", str(default_parents[0]))
        fields.setdefault("parent_b", str(default_parents[1]))
    return validate_recipe(fields, source=source)


def validate_recipe(fields: Mapping[str, object], *, source: str = "recipe") -> TuningRecipe:
    try:
        return TuningRecipe.model_validate(dict(fields))
    except ValidationError as exc:
        raise validation_error(source, exc) from None


def read_recipe_file(path: Path) -> dict[str, object]:
    """RECIPE.yaml's fields (nested as in TuningRecipe), parent paths made absolute against
    the file's folder; validated later, after command-line flags are applied."""
    from common.config_io import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, "recipe file")
    base = path.resolve().parent
    for key in ("parent_a", "parent_b"):
        if isinstance(raw.get(key), str) and not Path(raw[key]).is_absolute():
            raw[key] = str((base / raw[key]).resolve())
    return raw


def load_recipe(path: Path) -> TuningRecipe:
    """RECIPE.yaml to a validated recipe; errors name the file and the field."""
    return validate_recipe(read_recipe_file(path), source=str(path))

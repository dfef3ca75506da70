"""A hospital node's local settings: where its data and parents are, and what it will agree to.

They come from `flower-supernode --node-config 'key="value" ...'` (Flower's `context.node_config`)
and never leave the hospital. In simulation, nodes have only a partition id; the data then
comes from the run's simulation keys and the split the partition id selects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.dp.settings import DEFAULT_DELTA, DEFAULT_EPSILON, PrivacyMode
from common.errors import FedmergeError, validation_error
from common.metrics import HistogramSpec

FAULT_PATTERN = (
    r"^(|drop|fail:(score|setup|share_keys|collect_masked_vectors|unmask)"
    r"|slow:(score|setup|share_keys|collect_masked_vectors|unmask):\d+(\.\d+)?)$"
)

DEVICE_PATTERN = r"^(cpu|cuda|cuda:\d{1,2}|mps)$"
DEVICES = "cpu, cuda, cuda:N or mps"


class PrivacyPolicy(BaseModel):
    """The differential privacy this site demands of every run, and its budget.

    `min_mode`: the weakest mode accepted (off < distributed < local); deployments default to
    distributed noise. The per-run caps bound what one announcement may spend; the total is
    charged in the release ledger (zCDP ρ adds up over runs) and a run that would exceed it
    is refused before anything is scored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_mode: PrivacyMode = "distributed"
    max_epsilon_per_run: float = Field(default=DEFAULT_EPSILON, gt=0, le=64)
    max_epsilon_total: float = Field(default=4 * DEFAULT_EPSILON, gt=0, le=1000)
    max_delta: float = Field(default=DEFAULT_DELTA, gt=0, le=1e-3)


class SitePolicy(BaseModel):
    """What a site refuses, checked before anything is scored (rules in `client.policy`).

    Read strictly: an unknown key (a typo such as `min_site`) is an error, never a silently
    applied default.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fewer sites make a sum close to one site's own numbers.
    min_sites: int = Field(default=3, ge=2)
    # Histograms of very few patients reveal too much, even summed.
    min_cohort: int = Field(default=20, ge=1)
    min_positives: int = Field(default=5, ge=0)
    # Caps the compute any coordinator can ask for in one round, and rounds in one run.
    max_candidates: int = Field(default=32, ge=1, le=1024)
    max_rounds: int = Field(default=16, ge=1, le=1000)
    max_releases_per_day: int = Field(default=48, ge=1, le=10_000)
    # Announcements answered per hour (accepted or refused): probing the policy costs time.
    max_announcements_per_hour: int = Field(default=30, ge=1, le=10_000)
    # Pinned: what may shape a release is the site's choice, not the coordinator's.
    methods: tuple[Literal["slerp", "linear"], ...] = ("slerp", "linear")
    folds: int = Field(default=2, ge=2, le=10)
    fold_seed: int = 0
    score_folds: tuple[int, ...] = (0, 1)
    # None: the federation's default for the announced privacy mode (32 reference bins exact,
    # 8 with noise); either way one spec per mode, no other spec the coordinator names.
    histogram: HistogramSpec | None = None
    privacy: PrivacyPolicy = PrivacyPolicy()
    # Prompt templates this site scores: None is the paper's wording.
    templates: tuple[str | None, ...] = (None,)
    allow_chat_template: bool = False
    max_patient_tokens: int = Field(default=2048, ge=8, le=32768)
    max_batch_tokens: int = Field(default=65536, ge=64, le=1 << 22)


class SimulatedSplit(BaseModel):
    """How a simulated node carves its share out of a data spec every node loads."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: Literal["iid", "label", "size", "region"] = "region"
    sites: int = Field(ge=1)
    index: int = Field(ge=0)
    seed: int = 0


class NodeConfig(BaseModel):
    """One hospital node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The name the coordinator's report shows; a simulated node defaults to its split's label.
    site: str | None = Field(default=None, min_length=1)
    data: str = Field(min_length=1)
    parent_a: Path
    parent_b: Path
    # Checked here, not by torch at the first round (whose error is a long traceback).
    device: str = "cpu"
    # The live model's dtype (auto: float32 on CPU, bfloat16 on CUDA). Arithmetic is float32
    # either way; a bf16 live model halves the device memory the model takes.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # CUDA: where the parents live during the λ search (auto: on the GPU when they fit with a
    # margin, else streamed from host memory). See docs/operators.md, "Memory".
    parent_placement: Literal["auto", "device", "host"] = "auto"
    # CPU threads for scoring (None: torch's default, every core). Lower it when the node
    # shares its machine, e.g. several rehearsal nodes on one host.
    threads: int | None = Field(default=None, ge=1, le=1024)
    policy: SitePolicy = SitePolicy()
    # The release ledger (client/ledger.py): an append-only file that outlives runs and
    # restarts. None keeps no memory across rounds (simulation only).
    ledger: Path | None = None
    simulated: SimulatedSplit | None = None
    # Test-only fault injection: "fail:STAGE" answers STAGE with an error, "slow:STAGE:SECONDS"
    # stalls there; STAGE is score or a SecAgg+ stage (setup, share_keys,
    # collect_masked_vectors, unmask). "drop" = "fail:collect_masked_vectors".
    test_fault: str = Field(default="", pattern=FAULT_PATTERN)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError(f"expected one of {DEVICES}")
        return v


# node-config key -> (model field, nested policy field or None)
NODE_KEYS = {
    "site": "site",
    "data": "data",
    "parent-a": "parent_a",
    "parent-b": "parent_b",
    "device": "device",
    "dtype": "dtype",
    "parent-placement": "parent_placement",
    "threads": "threads",
    "ledger": "ledger",
    "test-fault": "test_fault",
}
POLICY_KEYS = {
    "min-sites": "min_sites",
    "min-cohort": "min_cohort",
    "min-positives": "min_positives",
    "max-candidates": "max_candidates",
    "max-rounds": "max_rounds",
    "max-releases-per-day": "max_releases_per_day",
    "max-announcements-per-hour": "max_announcements_per_hour",
    "methods": "methods",  # comma list
    "folds": "folds",
    "fold-seed": "fold_seed",
    "score-folds": "score_folds",  # comma list
    "bins": "histogram.bins",
    "lo": "histogram.lo",
    "hi": "histogram.hi",
    "bin-placement": "histogram.placement",
    "bin-reference": "histogram.reference",
    "privacy": "privacy.min_mode",
    "max-epsilon-per-run": "privacy.max_epsilon_per_run",
    "max-epsilon-total": "privacy.max_epsilon_total",
    "max-delta": "privacy.max_delta",
    "templates": "templates",  # JSON list; null is the paper's wording
    "allow-chat-template": "allow_chat_template",
    "max-patient-tokens": "max_patient_tokens",
    "max-batch-tokens": "max_batch_tokens",
}
_LIST_KEYS = {"methods", "score-folds"}


def _policy_from_flat(flat: Mapping[str, object], source: str) -> dict[str, object]:
    """Flower's flat `--node-config` policy keys -> SitePolicy fields."""
    import json

    out: dict[str, object] = {}
    for key, value in flat.items():
        field = POLICY_KEYS[key]
        if key in _LIST_KEYS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif key == "templates" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise FedmergeError(
                    f"{source}: key 'templates': expected a JSON list of strings or null"
                ) from None
        head, _, sub = field.partition(".")
        if sub:
            out.setdefault(head, {})[sub] = value  # type: ignore[index]
        else:
            out[head] = value
    return out


def policy_to_flat(policy: SitePolicy) -> dict[str, object]:
    """SitePolicy -> the flat keys `parse_node_config` reads (the inverse of the above)."""
    import json

    out: dict[str, object] = {}
    for key, field in POLICY_KEYS.items():
        head, _, sub = field.partition(".")
        parent = getattr(policy, head)
        if parent is None:
            continue  # a default that follows the run (the histogram spec): nothing to pin
        value = getattr(parent, sub) if sub else parent
        if key in _LIST_KEYS:
            value = ",".join(str(v) for v in value)
        elif key == "templates":
            value = json.dumps(list(value))
        out[key] = value
    return out


_SIM_KEYS = {"split": "split", "sim-sites": "sites", "sim-index": "index", "split-seed": "seed"}
_FLOWER_KEYS = {"partition-id", "num-partitions"}


def parse_node_config(
    node_config: Mapping[str, object], *, source: str = "node config"
) -> NodeConfig:
    """Validate Flower's node config into a NodeConfig, naming the offending key on error."""
    fields: dict[str, object] = {}
    policy: dict[str, object] = {}
    sim: dict[str, object] = {}
    for key, value in node_config.items():
        if key in NODE_KEYS:
            fields[NODE_KEYS[key]] = value
        elif key in POLICY_KEYS:
            policy[key] = value
        elif key in _SIM_KEYS:
            sim[_SIM_KEYS[key]] = value
        elif key not in _FLOWER_KEYS:
            expected = ", ".join(sorted([*NODE_KEYS, *POLICY_KEYS, *_SIM_KEYS]))
            raise FedmergeError(f"{source}: unknown key '{key}' (expected one of {expected})")
    if policy:
        fields["policy"] = _policy_from_flat(policy, source)
    if sim:
        fields["simulated"] = sim
    try:
        return NodeConfig.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(source, exc) from None


def simulated_node_config(
    partition_id: int,
    num_partitions: int,
    run_config: Mapping[str, object],
    parents: tuple[Path, Path],
) -> dict[str, object]:
    """The node config a partition of a simulation gets from the run's settings.

    Simulated hospitals are the researcher's own, so their policy pins what the run uses
    (histogram spec, fold seed, prompt) instead of the deployment defaults.
    """
    import json

    node: dict[str, object] = {
        "data": str(run_config.get("data") or "synthetic:"),
        "parent-a": str(parents[0]),
        "parent-b": str(parents[1]),
        "split": str(run_config.get("split") or "region"),
        "sim-sites": int(num_partitions),
        "sim-index": int(partition_id),
        "split-seed": int(run_config.get("split-seed", 0) or 0),
    }
    for key in ("bins", "lo", "hi", "fold-seed", "bin-placement", "bin-reference"):
        if run_config.get(key) not in (None, ""):
            node[key] = run_config[key]
    # The researcher's own sites accept the run's privacy setting, whatever it is.
    node["privacy"] = str(run_config.get("privacy") or "off")
    if run_config.get("epsilon") not in (None, ""):
        node["max-epsilon-per-run"] = run_config["epsilon"]
    if run_config.get("delta") not in (None, ""):
        node["max-delta"] = run_config["delta"]
    if run_config.get("template"):
        node["templates"] = json.dumps([None, str(run_config["template"])])
    if run_config.get("use-chat-template"):
        node["allow-chat-template"] = True
    return node

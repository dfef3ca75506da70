"""A hospital node's local settings: where its data and parents are, and what it will agree to.

They come from `flower-supernode --node-config 'key="value" ...'` (Flower's `context.node_config`)
and never leave the hospital. In simulation, nodes have only a partition id; the data then
comes from the run's simulation keys and the split the partition id selects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import FedmergeError, validation_error

FAULT_PATTERN = (
    r"^(|drop|fail:(score|setup|share_keys|collect_masked_vectors|unmask)"
    r"|slow:(score|setup|share_keys|collect_masked_vectors|unmask):\d+(\.\d+)?)$"
)


class SitePolicy(BaseModel):
    """What a site refuses, checked before anything is scored."""

    model_config = ConfigDict(frozen=True)

    # Fewer sites make a sum close to one site's own numbers.
    min_sites: int = Field(default=3, ge=2)
    # Histograms of very few patients reveal too much, even summed.
    min_cohort: int = Field(default=20, ge=1)
    min_positives: int = Field(default=5, ge=0)
    # Caps the compute any coordinator can ask for in one round.
    max_candidates: int = Field(default=32, ge=1)


class SimulatedSplit(BaseModel):
    """How a simulated node carves its share out of a data spec every node loads."""

    model_config = ConfigDict(frozen=True)

    split: Literal["iid", "label", "size", "region"] = "region"
    sites: int = Field(ge=1)
    index: int = Field(ge=0)
    seed: int = 0


class NodeConfig(BaseModel):
    """One hospital node."""

    model_config = ConfigDict(frozen=True)

    # The name the coordinator's report shows; a simulated node defaults to its split's label.
    site: str | None = Field(default=None, min_length=1)
    data: str = Field(min_length=1)
    parent_a: Path
    parent_b: Path
    device: str = "cpu"
    # CPU threads for scoring (None: torch's default, every core). Lower it when the node
    # shares its machine, e.g. several rehearsal nodes on one host.
    threads: int | None = Field(default=None, ge=1)
    policy: SitePolicy = SitePolicy()
    simulated: SimulatedSplit | None = None
    # Test-only fault injection: "fail:STAGE" answers STAGE with an error, "slow:STAGE:SECONDS"
    # stalls there; STAGE is score or a SecAgg+ stage (setup, share_keys,
    # collect_masked_vectors, unmask). "drop" = "fail:collect_masked_vectors".
    test_fault: str = Field(default="", pattern=FAULT_PATTERN)


# node-config key -> (model field, nested policy field or None)
NODE_KEYS = {
    "site": "site",
    "data": "data",
    "parent-a": "parent_a",
    "parent-b": "parent_b",
    "device": "device",
    "threads": "threads",
    "test-fault": "test_fault",
}
POLICY_KEYS = {
    "min-sites": "min_sites",
    "min-cohort": "min_cohort",
    "min-positives": "min_positives",
    "max-candidates": "max_candidates",
}
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
            policy[POLICY_KEYS[key]] = value
        elif key in _SIM_KEYS:
            sim[_SIM_KEYS[key]] = value
        elif key not in _FLOWER_KEYS:
            expected = ", ".join(sorted([*NODE_KEYS, *POLICY_KEYS, *_SIM_KEYS]))
            raise FedmergeError(f"{source}: unknown key '{key}' (expected one of {expected})")
    if policy:
        fields["policy"] = policy
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
    """The node config a partition of a `flwr run` simulation gets from the run's settings."""
    return {
        "data": str(run_config.get("data") or "synthetic:"),
        "parent-a": str(parents[0]),
        "parent-b": str(parents[1]),
        "split": str(run_config.get("split") or "region"),
        "sim-sites": int(num_partitions),
        "sim-index": int(partition_id),
        "split-seed": int(run_config.get("split-seed", 0) or 0),
    }

"""A whole federated tuning on Flower's simulation engine, in one process tree.

The real ServerApp and ClientApp run unchanged: the coordinator in a thread of this process,
the hospitals in Ray actors (one CPU each, so two sites score at once on a 2-core machine;
actors persist, so each keeps its parents loaded across rounds). Each simulated node gets a
node config naming the data spec and its share of the split; it loads and splits the data
itself with the same seed, so no per-site files are written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.errors import FedmergeError
from common.flower_runtime import set_offline_defaults

BACKEND_CONFIG = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


@dataclass
class SimulationResult:
    outcome: object  # server.coordinator.TuningOutcome
    grid: object  # server.grid.CoordinatorGrid: every message the coordinator exchanged
    out: Path
    sites: list[str]


class SimulationFailed(FedmergeError):
    """The tuning run stopped; `report` is the report.json it left (stage, cause, sites)."""

    def __init__(self, message: str, *, report: Path | None = None) -> None:
        super().__init__(message)
        self.report = report


def default_data_spec(sites: int | None) -> str:
    return f"synthetic:sites={sites}" if sites else "synthetic:"


def plan_sites(data: str, split: str, sites: int | None, seed: int) -> list[str]:
    """Load the data once here to name the sites and fail early on a bad split."""
    from common.data import load_records
    from common.data.splits import split_records

    names, _ = split_records(load_records(data), split, sites, seed)
    return names


def run_simulation(
    *,
    data: str | None = None,
    split: str = "region",
    sites: int | None = None,
    parents: tuple[Path, Path] | None = None,
    method: str = "slerp",
    search: str = "grid",
    out: str | Path = "runs/simulate",
    split_seed: int = 0,
    recipe_fields: Mapping[str, object] | None = None,
    node_overrides: Mapping[int, Mapping[str, object]] | None = None,
    node_settings: Mapping[str, object] | None = None,
    on_event: Callable[..., None] | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run one tuning with one simulated node per site; returns the outcome and the record."""
    set_offline_defaults()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr.simulation

    from client.client_app import make_client_app
    from client.node_config import parse_node_config, simulated_node_config
    from server.recipe import validate_recipe
    from server.server_app import make_server_app

    data = data or default_data_spec(sites)
    if parents is None:
        from simulation.demo_parents import demo_parent_dirs

        parents = demo_parent_dirs()
    parents = (Path(parents[0]).resolve(), Path(parents[1]).resolve())
    names = plan_sites(data, split, sites, split_seed)
    if len(names) < 3:
        raise FedmergeError(
            f"simulation: {len(names)} sites from {data} (split {split}); expected at least 3 "
            "(SecAgg+ and the site policy need three)"
        )
    fields: dict[str, object] = {
        "parent_a": str(parents[0]),
        "parent_b": str(parents[1]),
        "method": method,
        "search": {"strategy": search},
        # A researcher's simulation releases exact sums unless asked for noise (--privacy).
        "privacy": {"mode": "off"},
    }
    for key, value in (recipe_fields or {}).items():
        if isinstance(value, Mapping) and isinstance(fields.get(key), Mapping):
            fields[key] = {**fields[key], **value}  # type: ignore[dict-item]
        else:
            fields[key] = value
    recipe = validate_recipe(fields, source="simulation recipe")
    spec = recipe.histogram_spec
    run_keys = {
        "data": data, "split": split, "split-seed": split_seed,
        "bins": spec.bins, "lo": spec.lo, "hi": spec.hi,
        "bin-placement": spec.placement, "bin-reference": spec.reference,
        "privacy": recipe.privacy.mode, "epsilon": recipe.privacy.epsilon,
        "delta": recipe.privacy.delta,
        "fold-seed": recipe.fold_seed, "template": recipe.scoring.template or "",
        "use-chat-template": recipe.scoring.use_chat_template,
    }
    overrides: dict[int, dict[str, object]] = {}
    for i in range(len(names)):
        node = simulated_node_config(i, len(names), run_keys, parents)
        node.update(node_settings or {})  # device, dtype, parent-placement: every node's
        node.update((node_overrides or {}).get(i, {}))
        parse_node_config(node, source=f"simulated node {i}")  # a bad setting fails here
        overrides[i] = node
    sink: dict = {}
    server_app = make_server_app(
        recipe, out, expected_sites=len(names), on_event=on_event, sink=sink
    )
    client_app = make_client_app(overrides)
    if not verbose:
        import logging
        import warnings

        # Without --verbose the terminal shows fedmerge's progress only: Flower's notice that
        # run_simulation is deprecated (we pin 1.41, where it is the supported in-process
        # entry point) and Ray's accelerator tip are known and say nothing about this run.
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    flwr.simulation.run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(names),
        backend_config={
            "client_resources": dict(BACKEND_CONFIG["client_resources"]),
            "init_args": {"log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )
    if "error" in sink:
        raise SimulationFailed(sink["error"], report=sink.get("failure_report"))
    if "outcome" not in sink:
        raise FedmergeError("simulation: the coordinator finished without a result (see the log)")
    return SimulationResult(sink["outcome"], sink["grid"], Path(sink["out"]), names)

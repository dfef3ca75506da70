"""The coordinator as a Flower ServerApp.

`app` is what a deployment runs (`fedmerge coordinator submit` stages it): it reads the recipe
from `context.run_config` (the `[tool.flwr.app.config]` defaults plus `--run-config`
overrides) and writes the report to the run config's `out`. `make_server_app` builds the same
app around a given recipe for the in-process simulation, where the run config is empty and
the caller wants the outcome back, or with `default_parents` for `flwr run .`'s demo
(`simulation.flwr_app`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.recipe import TuningRecipe, recipe_from_run_config

DEFAULT_OUT = "runs/flwr"


def make_server_app(
    recipe: TuningRecipe | None = None,
    out_dir: str | Path | None = None,
    *,
    expected_sites: int | None = None,
    on_event=None,
    sink: dict | None = None,
    default_parents: Callable[[], tuple[Path, Path]] | None = None,
) -> ServerApp:
    """A ServerApp running one tuning; `sink` (if given) receives the outcome and the grid."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        from server.coordinator import run_tuning
        from server.grid import CoordinatorGrid
        from server.report import print_table, report_dict, write_report

        chosen = recipe or recipe_from_run_config(
            context.run_config,
            default_parents=default_parents() if default_parents is not None else None,
        )
        sites = expected_sites or int(context.run_config.get("sites", 0) or 0) or None
        out = Path(out_dir or str(context.run_config.get("out") or DEFAULT_OUT))
        recording = CoordinatorGrid(grid)
        if sink is not None:
            sink["grid"] = recording
        from common.errors import FedmergeError, RunStopped

        # Every run, deployed or simulated, keeps OUT/progress.json and leaves a report.json
        # whatever happens (server/run_progress.py): a failed one names stage, cause, rules
        # and the sites missing.
        from server.run_progress import RunTracker

        tracker = RunTracker(out, int(context.run_id), recording, sites)

        def events(kind: str, **info) -> None:
            tracker(kind, **info)
            if on_event is not None:
                on_event(kind, **info)

        try:
            outcome = run_tuning(
                recording, context, chosen, expected_sites=sites, on_event=events
            )
        except Exception as exc:
            from server.run_progress import write_failure_report

            message = str(exc) if isinstance(exc, FedmergeError) else type(exc).__name__
            cause = exc.cause if isinstance(exc, RunStopped) else "error"
            report = write_failure_report(out, tracker.failure(message, cause))
            if sink is None or not isinstance(exc, FedmergeError):
                raise
            sink["error"] = str(exc)  # the caller reports it as one line
            sink["failure_report"] = report
            return
        write_report(outcome, out)
        tracker.finished()
        if sink is not None:
            sink["outcome"] = outcome
            sink["out"] = out
        else:
            print_table(report_dict(outcome))

    return server_app


app = make_server_app()

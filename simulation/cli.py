"""`fedmerge simulate`: a whole federated λ search on simulated hospitals, on this machine.

Defaults are the built-in synthetic cohort (three hospitals) and the demo parent pair, so the
command runs offline out of the box. Top-level imports stay light so `fedmerge --help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def simulate(
    data: Annotated[
        str | None,
        typer.Option("--data", help="Data spec (default: the built-in synthetic cohort)."),
    ] = None,
    split: Annotated[
        str,
        typer.Option("--split", help="iid | label | size | region (the data's own sites)."),
    ] = "region",
    sites: Annotated[
        int | None, typer.Option("--sites", help="Number of simulated hospitals.")
    ] = None,
    parents: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--parents", help="Parent A (λ=0) and parent B (λ=1) directories."),
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="slerp | linear (default slerp).")
    ] = None,
    search: Annotated[
        str | None, typer.Option("--search", help="grid | adaptive (default grid).")
    ] = None,
    groups: Annotated[
        str | None,
        typer.Option("--groups", help="One λ per group, e.g. attention,mlp (default: one λ)."),
    ] = None,
    grid_points: Annotated[
        int | None, typer.Option("--grid-points", help="Points of the grid search (default 11).")
    ] = None,
    hard: Annotated[
        bool, typer.Option("--hard", help="Score the numeric sections only (Mortality-hard).")
    ] = False,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="A tuning recipe YAML (as `fedmerge coordinator submit` takes); flags win.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/simulate"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of the site split.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's own log.")] = False,
) -> None:
    """Tune the merge coefficient across simulated hospitals with SecAgg+ (Flower simulation)."""
    from common.errors import FedmergeError

    if method is not None and method not in ("slerp", "linear"):
        raise FedmergeError(f"--method {method}: expected slerp or linear")
    if search is not None and search not in ("grid", "adaptive"):
        raise FedmergeError(f"--search {search}: expected grid or adaptive")
    fields, parents, method, search = _recipe_fields(
        recipe, parents, method, search, groups, grid_points, hard
    )
    if data is None and split == "region" and sites is None:
        sites = 3
    if split != "region" and sites is None:
        sites = 3

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from server.report import print_table, report_dict
    from simulation.runner import run_simulation

    console = Console()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed:.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("starting the simulation engine", total=None)

    def on_event(kind: str, **info) -> None:
        if kind == "nodes":
            progress.update(task, description=f"{info['count']} hospitals connected")
        elif kind == "announced":
            msg = f"{len(info['accepted'])} hospitals accepted the recipe"
            if info["refusals"]:
                msg += f", {len(info['refusals'])} refused"
            progress.update(task, description=msg)
        elif kind == "round_start":
            n = len(info["candidates"])
            progress.update(
                task,
                description=f"{info['stage']}: scoring {n} merge{'s' if n > 1 else ''} (SecAgg+)",
            )
        elif kind == "round_end":
            progress.advance(task)
            best = max(
                (r.metrics.auroc for r in info["results"] if r.metrics.auroc is not None),
                default=None,
            )
            if best is not None:
                progress.update(task, description=f"{info['stage']}: best AUROC so far {best:.3f}")

    with progress:
        result = run_simulation(
            data=data,
            split=split,
            sites=sites,
            parents=parents,
            method=method,
            search=search,
            out=out,
            split_seed=seed,
            recipe_fields=fields,
            on_event=on_event,
            verbose=verbose,
        )
    print_table(report_dict(result.outcome), console)
    console.print(f"report: {result.out / 'report.json'}  curve: {result.out / 'curve.png'}")


def _recipe_fields(recipe, parents, method, search, groups, grid_points, hard):
    """Recipe fields from `--recipe` (if any) with the explicit flags on top; checked here so
    an error names the recipe file and field."""
    from server.deploy_run import read_recipe_yaml
    from server.recipe import validate_recipe
    from simulation.demo_parents import demo_parent_dirs

    fields = read_recipe_yaml(recipe) if recipe is not None else {}
    if parents is None and "parent_a" in fields and "parent_b" in fields:
        parents = (Path(fields["parent_a"]), Path(fields["parent_b"]))
    fields.pop("parent_a", None)
    fields.pop("parent_b", None)
    method = method or fields.pop("method", "slerp")
    fields.pop("method", None)
    search_fields = dict(fields.pop("search", None) or {})
    search = search or search_fields.pop("strategy", "grid")
    search_fields.pop("strategy", None)
    if grid_points is not None:
        search_fields["grid_points"] = grid_points
    if search_fields:
        fields["search"] = search_fields
    if groups is not None:
        fields["groups"] = [g.strip() for g in groups.split(",") if g.strip()]
    if hard:
        fields["scoring"] = {**(fields.get("scoring") or {}), "hard": True}
    a, b = parents if parents is not None else demo_parent_dirs()
    full = {"parent_a": str(a), "parent_b": str(b), "method": method, **fields}
    full["search"] = {**search_fields, "strategy": search}
    validate_recipe(full, source=str(recipe) if recipe is not None else "simulate options")
    return fields, parents, method, search


"""The simulation's commands: `fedmerge simulate` and `fedmerge demo-parents path|build`.

`simulate` runs a whole federated λ search on simulated hospitals on this machine. Defaults
are the built-in synthetic cohort (three hospitals) and the demo parent pair, so the command
runs offline out of the box. Top-level imports stay light so `fedmerge --help` is fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

demo_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    name="demo-parents",
    no_args_is_help=True,
    help="The built-in demo parents (toys, no clinical validity): show or rebuild them.",
)


def register(app: typer.Typer, certs: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.add_typer(demo_app, name="demo-parents")


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
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Seconds one site may take to score one candidate (default: from the parents' "
            "size); a slower site is left out of the round.",
        ),
    ] = None,
    privacy: Annotated[
        str | None,
        typer.Option(
            "--privacy",
            help="off | distributed | local differential privacy of the released histograms "
            "(default off in simulation: exact sums).",
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="ε per run when --privacy is on (default 8)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="Every simulated node's device: cpu, cuda, cuda:1.")
    ] = "cpu",
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Live model dtype: auto (float32 on CPU, bfloat16 on "
                     "CUDA) | float32 | bfloat16 | float16."),
    ] = "auto",
    parent_placement: Annotated[
        str,
        typer.Option("--parent-placement", help="CUDA: parents on the GPU (device), streamed "
                     "from host memory (host), or auto (on the GPU when they fit)."),
    ] = "auto",
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
    if timeout is not None:
        if timeout <= 0:
            raise FedmergeError(f"--timeout {timeout}: expected seconds > 0")
        fields["score_timeout"] = timeout
    if privacy is not None or epsilon is not None:
        if privacy is not None and privacy not in ("off", "distributed", "local"):
            raise FedmergeError(f"--privacy {privacy}: expected off, distributed or local")
        chosen = dict(fields.get("privacy") or {})
        if privacy is not None:
            chosen["mode"] = privacy
        if epsilon is not None:
            if not 0 < epsilon <= 64:
                raise FedmergeError(f"--epsilon {epsilon}: expected 0 < ε <= 64")
            chosen.setdefault("mode", "distributed")
            chosen["epsilon"] = epsilon
        fields["privacy"] = chosen
    if data is None and split == "region" and sites is None:
        sites = 3
    if split != "region" and sites is None:
        sites = 3

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from server.report import print_table, report_dict
    from simulation.runner import SimulationFailed, run_simulation

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
    scored: dict[str, int] = {}  # site -> candidates done in the current round

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
            scored.clear()
            progress.update(
                task, description=f"{info['stage']}: scoring {n} merge{'s' if n > 1 else ''}"
            )
        elif kind == "score_progress":
            scored[info["site"]] = info["done"]
            total = info["total"]
            ready = sum(d == total for d in scored.values())
            progress.update(
                task,
                description=f"{info['stage']}: scoring {total} merges, {ready}/{len(scored)} "
                f"sites done, slowest at {min(scored.values())}/{total}",
            )
        elif kind == "secagg_start":
            progress.update(
                task, description=f"{info['stage']}: SecAgg+ sum over {info['sites']} sites"
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
        try:
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
                node_settings={"device": device, "dtype": dtype,
                               "parent-placement": parent_placement},
                on_event=on_event,
                verbose=verbose,
            )
        except SimulationFailed as exc:
            if exc.report is not None:
                console.print(f"report: {exc.report}")
            raise
    print_table(report_dict(result.outcome), console)
    console.print(f"report: {result.out / 'report.json'}  curve: {result.out / 'curve.png'}")


def _recipe_fields(recipe, parents, method, search, groups, grid_points, hard):
    """Recipe fields from `--recipe` (if any) with the explicit flags on top; checked here so
    an error names the recipe file and field."""
    from server.recipe import read_recipe_file, validate_recipe
    from simulation.demo_parents import demo_parent_dirs

    fields = read_recipe_file(recipe) if recipe is not None else {}
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


@demo_app.command("path")
def path_command() -> None:
    """Print the directories of parent A (λ = 0) and parent B (λ = 1)."""
    from simulation.demo_parents import demo_parent_dirs

    for directory in demo_parent_dirs():
        typer.echo(str(directory))


@demo_app.command("build")
def build_command(
    out: Path = typer.Option(None, "--out", help="output directory (default: the package's)"),
    reduced: bool = typer.Option(False, "--reduced", help="tiny sizes and a few steps"),
    keep_base: bool = typer.Option(False, "--keep-base", help="also write the shared base"),
) -> None:
    """Rebuild base and parents from fedmerge's synthetic corpora, seeded, on CPU."""
    from rich.console import Console

    from simulation.build_demo_parents import BuildConfig, build
    from simulation.demo_parents import PACKAGE_DIR

    console = Console(stderr=True)
    cfg = BuildConfig.reduced() if reduced else BuildConfig()
    with console.status("building the demo parents") as status:
        result = build(out or PACKAGE_DIR, cfg, log=status.update, keep_base=keep_base)
    for name, directory in result["dirs"].items():
        typer.echo(f"{name}\t{directory}")
    console.print(f"built in {result['seconds']:.0f} s ({result['parameters']:,} parameters each)")

"""`fedmerge demo-parents ...`: where the built-in parents live, and how to rebuild them."""

from __future__ import annotations

from pathlib import Path

import typer

demo_app = typer.Typer(
    name="demo-parents",
    no_args_is_help=True,
    help="The built-in demo parents (toys, no clinical validity): show or rebuild them.",
)


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


def register(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo-parents")

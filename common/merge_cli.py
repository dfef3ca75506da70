"""`fedmerge merge CONFIG.yaml OUT_DIR`: write a merge described by a mergekit-style recipe.

Imports nothing heavy at module level (see common/cli.py): torch loads only when a merge runs.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        config: Path = typer.Argument(..., help="Merge recipe (mergekit-style YAML)."),
        out_dir: Path = typer.Argument(..., help="Output model directory (must not exist)."),
        shard_size: str = typer.Option(
            "5GB", "--shard-size", help="Largest weight shard: bytes or e.g. 500MB, 2GB, 512MiB."
        ),
        random_seed: int = typer.Option(
            0, "--random-seed", help="Seed for the random drop masks of dare_linear/dare_ties."
        ),
    ) -> None:
        """Merge Hugging Face checkpoints (linear, slerp, task_arithmetic, ties, dare_linear,
        dare_ties) into OUT_DIR, checking every parent before any work is done."""
        from common.merge.config import MergeConfig
        from common.merge.writer import parse_size, write_merge

        size = parse_size(shard_size)
        recipe = MergeConfig.from_yaml(config)
        out = write_merge(recipe, out_dir, shard_size=size, seed=random_seed, progress=True)
        typer.echo(f"wrote {out} ({recipe.merge_method} of {len(recipe.model_paths())} models)")

"""The `fedmerge` command line: the one place that lists every folder's commands.

Each folder contributes its commands through one module: `common.cli` (this one: merge,
score), `server.cli` (certs ca/server, coordinator), `client.cli` (node, certs node) and
`simulation.cli` (simulate, demo-parents). This module is the single, documented place in
`common/` that reaches up into the other folders, and only by name, at start-up. Top-level
imports stay light, so `fedmerge --help` is fast; torch, transformers and flwr are imported
inside the commands that need them.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer

# Each defines `register(app, certs)`; `certs` is the group both operators' key commands share.
COMMAND_MODULES = ("server.cli", "client.cli", "simulation.cli")

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    name="fedmerge",
    no_args_is_help=True,
    add_completion=False,
    help="Federated merge-tuning of clinical language models: pick the merge coefficient "
    "by pooled AUROC across hospitals, without moving patient data.",
)
certs_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold patient text
    no_args_is_help=True,
    help="Make the deployment's key material: CA, SuperLink certificate, node keys.",
)


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


def score(
    model: Annotated[Path, typer.Option("--model", help="Checkpoint directory.")],
    data: Annotated[str, typer.Option("--data", help="Data spec: jsonl:PATH, csv:PATH, ...")],
    fold: Annotated[int | None, typer.Option("--fold", help="Keep only fold I (0-based).")] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="Number of folds.")] = None,
    batch_tokens: Annotated[int, typer.Option(help="Rows × padded length per batch.")] = 4096,
    max_patient_tokens: Annotated[int, typer.Option(help="Budget for the patient text.")] = 512,
    hard: Annotated[bool, typer.Option("--hard", help="Numeric sections only.")] = False,
    chat_template: Annotated[
        bool, typer.Option("--chat-template", help="Wrap the prompt in the tokenizer's template.")
    ] = False,
    parity: Annotated[
        bool, typer.Option("--parity", help="Paper path: generate 2 tokens and parse them.")
    ] = False,
    scores_out: Annotated[
        Path | None, typer.Option("--scores-out", help="Write id,label,p_yes per stay.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Last stdout line is JSON.")] = False,
) -> None:
    """Score a model's yes/no answers on labelled stays: AUROC, AUPRC, 95% CI, throughput."""
    from common.errors import FedmergeError
    from common.model_io import require_checkpoint
    from common.scoring.local_run import (
        load_fold,
        load_model,
        run_parity,
        run_scorer,
        write_scores,
    )

    if (fold is None) != (folds is None):
        raise FedmergeError("--fold/--folds: got only one; expected both or neither")
    require_checkpoint(model, "--model")
    records = load_fold(data, hard, fold, folds)
    tokenizer, lm = load_model(model)

    from rich.console import Console

    err = Console(stderr=True)
    start = time.perf_counter()
    with _progress(err, len(records)) as advance:
        result = (
            run_parity(lm, tokenizer, records, max_patient_tokens, chat_template, advance)
            if parity
            else run_scorer(
                lm, tokenizer, records, batch_tokens, max_patient_tokens, chat_template, advance,
                hard=hard,
            )
        )
    elapsed = time.perf_counter() - start
    summary = {
        "n": result["metrics"].n,
        "positives": result["metrics"].positives,
        "auroc": result["metrics"].auroc,
        "auprc": result["auprc"],
        "auroc_ci": list(result["metrics"].auroc_ci) if result["metrics"].auroc_ci else None,
        "federated": result.get("federated"),
        "stays_per_s": len(records) / elapsed if elapsed > 0 else None,
    }
    if scores_out is not None:
        write_scores(scores_out, [r.stay_id for r in records], [r.label for r in records],
                      result["p_yes"])
    out = err if as_json else Console()
    out.print(_table(summary, result, model, data, parity))
    if as_json:
        typer.echo(json.dumps(summary))


class _progress:
    """A rich progress bar on stderr; yields the callback the scorers call per batch."""

    def __init__(self, console, total: int):
        from rich.progress import Progress

        self._bar = Progress(console=console, transient=True)
        self._total = total

    def __enter__(self):
        self._bar.__enter__()
        task = self._bar.add_task("scoring", total=self._total)
        return lambda rows: self._bar.advance(task, rows)

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)


def _fmt(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def _table(summary: dict, result: dict, model: Path, data: str, parity: bool):
    from rich.table import Table

    title = f"{model.name} on {data}" + (" (paper parity)" if parity else "")
    table = Table(title=title, show_header=False)
    table.add_row("stays (n)", str(summary["n"]))
    table.add_row("positives", str(summary["positives"]))
    table.add_row("AUROC", _fmt(summary["auroc"]))
    table.add_row("AUPRC", _fmt(summary["auprc"]))
    ci = summary["auroc_ci"]
    ci_text = "undefined" if ci is None else f"{ci[0]:.4f} – {ci[1]:.4f}"
    table.add_row("AUROC 95% CI (DeLong)", ci_text)
    fed = summary.get("federated")
    if fed and fed["auroc"] is not None:
        table.add_row(
            f"federated view ({fed['bins']} bins)",
            f"AUROC {fed['auroc']:.4f} (off by {fed['auroc_error']:.4f}), "
            f"AUPRC {_fmt(fed['auprc'])} (off by {_fmt(fed['auprc_error'])})",
        )
    table.add_row("throughput", f"{summary['stays_per_s']:.1f} stays/s")
    for key, value in result["notes"].items():
        table.add_row(key, str(value))
    return table


def register(app: typer.Typer, certs: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("score")(score)


register(app, certs_app)
for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app, certs_app)
app.add_typer(certs_app, name="certs")


def main() -> None:
    from common.errors import FedmergeError

    try:
        app()
    except FedmergeError as exc:
        # Bad input is the user's to fix: one clear line, no traceback, a non-zero exit.
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

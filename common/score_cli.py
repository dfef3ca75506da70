"""`fedmerge score`: one model on one hospital's data, with the metrics the search uses.

It goes through the same histograms as the federated search, so a site can check locally what
its contribution looks like. Top-level imports stay light so `fedmerge --help` stays fast.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("score")(score)


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

    if (fold is None) != (folds is None):
        raise FedmergeError("--fold/--folds: got only one; expected both or neither")
    if not (model / "config.json").is_file():
        raise FedmergeError(f"--model {model}: config.json not found; expected a checkpoint dir")
    records = _records(data, hard, fold, folds)
    tokenizer, lm = _load(model)

    from rich.console import Console

    err = Console(stderr=True)
    start = time.perf_counter()
    with _progress(err, len(records)) as advance:
        result = (
            _run_parity(lm, tokenizer, records, max_patient_tokens, chat_template, advance)
            if parity
            else _run_scorer(
                lm, tokenizer, records, batch_tokens, max_patient_tokens, chat_template, advance
            )
        )
    elapsed = time.perf_counter() - start
    summary = {
        "n": result["metrics"].n,
        "positives": result["metrics"].positives,
        "auroc": result["metrics"].auroc,
        "auprc": result["auprc"],
        "auroc_ci": list(result["metrics"].auroc_ci) if result["metrics"].auroc_ci else None,
        "auroc_error_bound": result["metrics"].auroc_error_bound,
        "stays_per_s": len(records) / elapsed if elapsed > 0 else None,
    }
    if scores_out is not None:
        _write_scores(scores_out, [r.stay_id for r in records], [r.label for r in records],
                      result["p_yes"])
    out = err if as_json else Console()
    out.print(_table(summary, result, model, data, parity))
    if as_json:
        typer.echo(json.dumps(summary))


def _records(data: str, hard: bool, fold: int | None, folds: int | None):
    from common.data import load_records
    from common.errors import FedmergeError

    records = load_records(data, hard=hard)
    if fold is not None:
        from common.data.folds import select_fold

        records = select_fold(records, fold, folds)
        if not records:
            raise FedmergeError(f"--data {data}: fold {fold} of {folds} is empty; expected stays")
    return records


def _load(model_dir: Path):
    """Tokenizer and model from a local directory; fp32 on CPU, bf16 weights on CUDA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.errors import FedmergeError

    cuda = torch.cuda.is_available()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        lm = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.bfloat16 if cuda else torch.float32
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedmergeError(f"--model {model_dir}: cannot load ({first})") from None
    return tokenizer, lm.to("cuda" if cuda else "cpu").eval()


def _run_scorer(lm, tokenizer, records, batch_tokens, max_patient_tokens, chat, advance):
    from common.metrics import pooled_metrics, score_histograms
    from common.scoring import PromptTemplate, YesNoScorer, p_yes

    scorer = YesNoScorer(
        lm, tokenizer, template=PromptTemplate(use_chat_template=chat),
        batch_tokens=batch_tokens, max_patient_tokens=max_patient_tokens,
    )
    prepared = scorer.prepare(records)
    log_odds = scorer.score(prepared, progress=advance)
    metrics = pooled_metrics(*score_histograms(log_odds, prepared.labels))
    return {
        "metrics": metrics, "auprc": metrics.auprc, "p_yes": p_yes(log_odds),
        "notes": {"truncated": prepared.truncated,
                  "padding": f"{100 * prepared.padding_fraction:.1f}%"},
    }


def _run_parity(lm, tokenizer, records, max_patient_tokens, chat, advance):
    """AUROC from the parsed answers, AUPRC from first-step yes/no probabilities (the paper)."""
    import numpy as np

    from common.metrics import HistogramSpec, pooled_metrics, score_histograms
    from common.scoring import ParityScorer, PromptTemplate, p_yes

    result = ParityScorer(
        lm, tokenizer, template=PromptTemplate(use_chat_template=chat),
        max_patient_tokens=max_patient_tokens,
    ).run(records, progress=advance)
    # Parsed answers as scores: positive above unparsed above negative.
    answer_score = result.predictions.astype(np.float64)
    answer_score[result.predictions == -1] = 0.0
    answer_score[result.predictions == 0] = -1.0
    answers = pooled_metrics(*score_histograms(answer_score, result.labels, HistogramSpec(bins=3,
                                               lo=-1.5, hi=1.5)))
    probs = pooled_metrics(*score_histograms(result.log_odds, result.labels))
    return {
        "metrics": answers, "auprc": probs.auprc, "p_yes": p_yes(result.log_odds),
        "notes": {"unparsed answers": int((result.predictions == -1).sum()),
                  "padding": f"{100 * result.padding_fraction:.1f}%"},
    }


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


def _write_scores(path: Path, ids, labels, probs) -> None:
    """id,label,p_yes per stay, written to a sibling temp file and renamed (never half-written)."""
    import csv

    from common.errors import FedmergeError

    if not path.parent.is_dir():
        raise FedmergeError(f"--scores-out {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "label", "p_yes"])
            for sid, label, p in zip(ids, labels, probs, strict=True):
                writer.writerow([sid, int(label), repr(float(p))])
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
    table.add_row("AUROC binning error ≤", f"{summary['auroc_error_bound']:.2e}")
    table.add_row("throughput", f"{summary['stays_per_s']:.1f} stays/s")
    for key, value in result["notes"].items():
        table.add_row(key, str(value))
    return table

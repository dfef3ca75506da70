"""One model scored on one site's records, locally: what `fedmerge score` runs.

Why apart from the command: the loading, the two scoring paths (fast yes/no and the paper's
parity path) and the scores file are the work; the command only parses options and prints.
"""

from __future__ import annotations

import os
from pathlib import Path


def load_fold(data: str, hard: bool, fold: int | None, folds: int | None):
    from common.data import load_records
    from common.errors import FedmergeError

    records = load_records(data, hard=hard)
    if fold is not None:
        from common.data.folds import select_fold

        records = select_fold(records, fold, folds)
        if not records:
            raise FedmergeError(f"--data {data}: fold {fold} of {folds} is empty; expected stays")
    return records


def load_model(model_dir: Path):
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


def run_scorer(lm, tokenizer, records, batch_tokens, max_patient_tokens, chat, advance,
               hard: bool = False):
    """Exact metrics of this model's scores, and what a federation would see of them."""
    from common.metrics import exact_metrics
    from common.scoring import PromptTemplate, YesNoScorer, p_yes

    scorer = YesNoScorer(
        lm, tokenizer, template=PromptTemplate(use_chat_template=chat),
        batch_tokens=batch_tokens, max_patient_tokens=max_patient_tokens,
    )
    prepared = scorer.prepare(records)
    log_odds = scorer.score(prepared, progress=advance)
    metrics = exact_metrics(log_odds, prepared.labels)
    return {
        "metrics": metrics, "auprc": metrics.auprc, "p_yes": p_yes(log_odds),
        "federated": federated_view(scorer, log_odds, prepared.labels, metrics, hard),
        "notes": {"truncated": prepared.truncated,
                  "padding": f"{100 * prepared.padding_fraction:.1f}%"},
    }


def federated_view(scorer, log_odds, labels, exact, hard: bool = False) -> dict:
    """The binned figures a federation releases for these scores (the default 32 bins placed
    by the public reference cohort, scored by the same model and sections), with their
    error."""
    from common.data import load_records
    from common.metrics import FEDERATED_HISTOGRAM, pooled_metrics, score_histograms

    spec = FEDERATED_HISTOGRAM
    reference = scorer.score(scorer.prepare(load_records(spec.reference, hard=hard)))
    binned = pooled_metrics(
        *score_histograms(log_odds, labels, spec, spec.reference_edges(reference))
    )

    def gap(a, b):
        return None if a is None or b is None else abs(a - b)

    return {
        "bins": spec.bins, "reference": spec.reference,
        "auroc": binned.auroc, "auprc": binned.auprc,
        "auroc_error": gap(binned.auroc, exact.auroc),
        "auprc_error": gap(binned.auprc, exact.auprc),
    }


def run_parity(lm, tokenizer, records, max_patient_tokens, chat, advance):
    """AUROC from the parsed answers, AUPRC from first-step yes/no probabilities (the paper)."""
    import numpy as np

    from common.metrics import HistogramSpec, exact_metrics, pooled_metrics, score_histograms
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
    probs = exact_metrics(result.log_odds, result.labels)
    return {
        "metrics": answers, "auprc": probs.auprc, "p_yes": p_yes(result.log_odds),
        "notes": {"unparsed answers": int((result.predictions == -1).sum()),
                  "padding": f"{100 * result.padding_fraction:.1f}%"},
    }


def write_scores(path: Path, ids, labels, probs) -> None:
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

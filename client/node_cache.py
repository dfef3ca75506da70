"""Per-process cache of what is expensive for a hospital node: parents, hashes, tokenization.

A tuning run asks a site for many merges over several rounds. Loading two checkpoints,
hashing their files and tokenizing the cohort are the same work every time, so they are done
once per process (a Ray actor in simulation, the ClientApp process in deployment) and reused;
only the in-place switch to the next λ and the forward passes remain per candidate. One
process may serve several simulated nodes, so data entries are keyed by the node's settings.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.node_config import NodeConfig
from common.errors import FedmergeError
from common.protocol import ScoringSettings
from common.records import PatientRecord

_LOCK = threading.RLock()
_FINGERPRINTS: dict[Path, str] = {}
_MERGER: dict[tuple, object] = {}  # at most one live merger: memory is the scarce resource
_RECORDS: dict[tuple, tuple[str, list[PatientRecord]]] = {}
_PREPARED: dict[tuple, object] = {}


@dataclass(frozen=True)
class FoldData:
    """One fold of one site, ready to score."""

    prepared: object  # common.scoring.PreparedDataset
    labels: np.ndarray
    n: int
    positives: int
    tokens: int


def parent_fingerprint(path: Path) -> str:
    """SHA-256 of a parent directory's weights and config, computed once per process."""
    from common.model_io import fingerprint, require_checkpoint

    key = Path(path).resolve()
    with _LOCK:
        if key not in _FINGERPRINTS:
            _FINGERPRINTS[key] = fingerprint(require_checkpoint(key, "parent model"))
        return _FINGERPRINTS[key]


def merger(cfg: NodeConfig, method: str):
    """The node's InPlaceMerger for its parents and `method`, loaded on first use."""
    from common.merge.switch import InPlaceMerger

    key = (Path(cfg.parent_a).resolve(), Path(cfg.parent_b).resolve(), method, cfg.device,
           cfg.dtype, cfg.parent_placement)
    with _LOCK:
        if key not in _MERGER:
            import torch

            _MERGER.clear()
            _PREPARED.clear()  # prepared batches belong to the previous tokenizer
            dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
            _MERGER[key] = InPlaceMerger(
                cfg.parent_a, cfg.parent_b, method=method, device=cfg.device, dtype=dtype,
                parents=cfg.parent_placement,
            )
        return _MERGER[key]


def _tokenizer_of(cfg: NodeConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(cfg.parent_a))


def scorer(cfg: NodeConfig, method: str, scoring: ScoringSettings):
    """A YesNoScorer bound to the live merged model (it reads the current weights)."""
    from common.scoring import PromptTemplate, YesNoScorer

    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    live = merger(cfg, method)
    with _LOCK:
        tok_key = ("tokenizer", Path(cfg.parent_a).resolve())
        tokenizer = _PREPARED.get(tok_key)
        if tokenizer is None:
            tokenizer = _PREPARED[tok_key] = _tokenizer_of(cfg)
    template = (
        PromptTemplate(use_chat_template=scoring.use_chat_template)
        if scoring.template is None
        else PromptTemplate(template=scoring.template, use_chat_template=scoring.use_chat_template)
    )
    return YesNoScorer(
        live.model,
        tokenizer,
        template=template,
        batch_tokens=scoring.batch_tokens,
        max_patient_tokens=scoring.max_patient_tokens,
        device=cfg.device,
    )


def site_records(cfg: NodeConfig, hard: bool) -> tuple[str, Sequence[PatientRecord]]:
    """(site name, records) of this node, loading and splitting the data spec once."""
    from common.data import load_records

    key = (cfg.data, hard, cfg.simulated, cfg.site)
    with _LOCK:
        if key not in _RECORDS:
            # Simulated nodes sharing a process share one load of the whole data set.
            source = ("all", cfg.data, hard)
            if source not in _RECORDS:
                _RECORDS[source] = ("", load_records(cfg.data, hard=hard))
            records = _RECORDS[source][1]
            name = cfg.site or "site"
            if cfg.simulated is not None:
                from common.data.splits import split_records

                sim = cfg.simulated
                sites = None if sim.split == "region" else sim.sites
                names, parts = split_records(records, sim.split, sites, sim.seed)
                if sim.index >= len(parts):
                    raise FedmergeError(
                        f"node config: sim-index {sim.index} but split '{sim.split}' of "
                        f"{cfg.data} has {len(parts)} sites; expected an index below it"
                    )
                records = parts[sim.index]
                name = cfg.site or names[sim.index]
            _RECORDS[key] = (name, records)
        return _RECORDS[key]


def fold_counts(cfg: NodeConfig, fold: int, folds: int, seed: int, hard: bool) -> tuple[int, int]:
    """(records, positives) in one fold: what the site policy's minimums are checked on."""
    from common.data.folds import select_fold
    from common.data.lazy import labels

    _, records = site_records(cfg, hard)
    chosen = select_fold(records, fold, folds, seed)
    return len(chosen), sum(labels(chosen))  # a label column: counting builds no record


def fold_data(
    cfg: NodeConfig, method: str, scoring: ScoringSettings, fold: int, folds: int, seed: int
) -> tuple[object, FoldData]:
    """(scorer, tokenized fold) — tokenization is reused across candidates and rounds."""
    from common.data.folds import select_fold

    live_scorer = scorer(cfg, method, scoring)
    key = (
        cfg.data,
        cfg.simulated,
        cfg.site,
        scoring,
        fold,
        folds,
        seed,
        Path(cfg.parent_a).resolve(),
    )
    with _LOCK:
        if key not in _PREPARED:
            _, records = site_records(cfg, scoring.hard)
            chosen = select_fold(records, fold, folds, seed)
            if not chosen:
                raise FedmergeError(f"site data {cfg.data}: fold {fold} of {folds} is empty")
            prepared = live_scorer.prepare(chosen)
            labels = np.asarray(prepared.labels, dtype=np.int64)
            _PREPARED[key] = FoldData(
                prepared=prepared,
                labels=labels,
                n=len(labels),
                positives=int(labels.sum()),
                tokens=int(np.sum(prepared.lengths)),
            )
        return live_scorer, _PREPARED[key]


def reference_prepared(cfg: NodeConfig, method: str, scoring: ScoringSettings, reference: str):
    """The public reference cohort that places the bins, tokenized once per process.

    It is loaded from its data spec (the site's policy pins which one), never from the
    site's own records, so the bin edges computed from it carry nothing of the site.
    """
    from common.data import load_records

    live_scorer = scorer(cfg, method, scoring)
    key = ("reference", reference, scoring, Path(cfg.parent_a).resolve())
    with _LOCK:
        if key not in _PREPARED:
            records = load_records(reference, hard=scoring.hard)
            if len(records) < 2:
                raise FedmergeError(f"histogram reference {reference}: expected at least 2 stays")
            _PREPARED[key] = live_scorer.prepare(records)
        return live_scorer, _PREPARED[key]


def clear() -> None:
    """Drop every cached object (tests, or a node switching parents)."""
    with _LOCK:
        _FINGERPRINTS.clear()
        _MERGER.clear()
        _RECORDS.clear()
        _PREPARED.clear()

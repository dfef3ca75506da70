"""How much scoring `adaptive` saves against the 11-point grid, and what it gives up.

On the synthetic cohort's tuning fold (all sites pooled, exactly what the federated sum
yields), with the demo parents (or --parents): the reference is the best AUROC of a 21-point
grid; the baseline is PatientDx's 11-point grid. Every λ is scored centrally with the same
scorer and histograms the hospitals use; the search code is the coordinator's own
(`server.search`). Cost counts λ evaluations and forward (prompt) tokens.
Last line: one JSON object. Targets: cost_ratio <= 0.5 and auroc_gap <= 0.005.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.flower_runtime import set_offline_defaults  # noqa: E402

set_offline_defaults()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic:", help="Data spec (default: synthetic cohort).")
    ap.add_argument("--parents", nargs=2, type=Path, default=None)
    ap.add_argument("--method", default="slerp", choices=["slerp", "linear"])
    ap.add_argument("--max-patient-tokens", type=int, default=512)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from common.data import load_records
    from common.data.folds import select_fold
    from common.merge.switch import InPlaceMerger
    from common.metrics import HistogramSpec, pooled_metrics, score_histograms
    from common.scoring import YesNoScorer
    from server.recipe import SearchSettings
    from server.search import best_of, grid_points, make_search, run_search

    if args.parents is None:
        from simulation.demo_parents import demo_parent_dirs

        args.parents = demo_parent_dirs()
    a, b = args.parents
    t0 = time.perf_counter()
    records = select_fold(load_records(args.data), 0, 2, 0)
    merger = InPlaceMerger(a, b, method=args.method)
    scorer = YesNoScorer(
        merger.model, AutoTokenizer.from_pretrained(a), max_patient_tokens=args.max_patient_tokens
    )
    prepared = scorer.prepare(records)
    tokens_per_eval = int(prepared.lengths.sum())
    spec = HistogramSpec()
    cache: dict[float, object] = {}

    def metrics(lam: float):
        lam = round(float(lam), 10)
        if lam not in cache:
            merger.apply(lam)
            pos, neg = score_histograms(scorer.score(prepared), prepared.labels, spec)
            cache[lam] = pooled_metrics(pos, neg)
        return cache[lam]

    def counting(log):
        def evaluate(cands, rnd):
            log.extend(cands)
            return [metrics(c) for c in cands]

        return evaluate

    fine = {x: metrics(x).auroc for x in grid_points(21)}
    best21 = max(fine.values())
    grid_log: list = []
    grid_hist = run_search(make_search(SearchSettings(grid_points=11)), counting(grid_log), 11)
    adaptive_log: list = []
    adaptive = SearchSettings(strategy="adaptive")  # the recipe's defaults
    ad_hist = run_search(make_search(adaptive), counting(adaptive_log), 11)
    ad_best = best_of(ad_hist)
    grid_best = best_of(grid_hist)
    out = {
        "records": len(records),
        "tokens_per_eval": tokens_per_eval,
        "grid_evals": len(grid_log),
        "adaptive_evals": len(adaptive_log),
        "grid_tokens": len(grid_log) * tokens_per_eval,
        "adaptive_tokens": len(adaptive_log) * tokens_per_eval,
        "cost_ratio": len(adaptive_log) / len(grid_log),
        "best21_auroc": best21,
        "grid_auroc": grid_best.metrics.auroc,
        "adaptive_auroc": ad_best.metrics.auroc,
        "adaptive_lambda": ad_best.candidate,
        "adaptive_path": adaptive_log,
        "auroc_gap": best21 - ad_best.metrics.auroc,
        "grid_gap": best21 - grid_best.metrics.auroc,
        "adaptive_settings": adaptive.model_dump(),
        "seconds": time.perf_counter() - t0,
    }
    print("λ      AUROC (21-point reference curve)")
    for x, v in fine.items():
        print(f"{x:5.2f}  {v:.4f}")
    print(
        f"adaptive: {out['adaptive_evals']} evals, λ*={out['adaptive_lambda']}, "
        f"gap {out['auroc_gap']:.4f}; grid: {out['grid_evals']} evals, gap {out['grid_gap']:.4f}; "
        f"cost ratio {out['cost_ratio']:.2f}"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

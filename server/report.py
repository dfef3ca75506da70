"""The tuning run's output directory: report.json, curve.png, recipe.yaml, and a terminal table.

Everything is written into a temporary sibling directory and moved into place at the end, so
a failed run never leaves a report that looks complete. `recipe.yaml` is the mergekit-style
recipe for λ*, which `fedmerge merge` turns into the same tensors the sites scored.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from server.coordinator import CandidateResult, TuningOutcome


def _lam(c):
    return dict(c) if isinstance(c, dict) else float(c)


def _figures(r: CandidateResult, smoothed: float | None = None) -> dict:
    m = r.metrics
    return {
        "lambda": _lam(r.candidate),
        "auroc": m.auroc,
        # With noise: the curve's posterior mean at this λ (server.noisy_curve), which λ* uses.
        "auroc_smoothed": smoothed,
        "auprc": m.auprc,
        "auroc_ci": list(m.auroc_ci) if m.auroc_ci is not None else None,
        "n": m.n,
        "positives": m.positives,
        "auroc_error_bound": m.auroc_error_bound,
        "noise_sd": m.noise_sd,
        "sites": list(r.sites),
        "round": r.round,
    }


def report_dict(outcome: TuningOutcome) -> dict:
    """The JSON report: λ*, the tuning curve, the held-out figures, who took part."""
    from server.noisy_curve import smoothed_aurocs

    recipe = outcome.recipe
    smooth = smoothed_aurocs(outcome.tune) or [None] * len(outcome.tune)
    return {
        "lambda_star": _lam(outcome.lambda_star),
        "method": recipe.method,
        "groups": list(recipe.groups) if recipe.groups else None,
        "search": recipe.search.strategy,
        "recipe_fingerprint": recipe.fingerprint(),
        "parents": {
            "parent_a": recipe.parent_a,
            "parent_b": recipe.parent_b,
            "fingerprint_a": recipe.fingerprint_a,
            "fingerprint_b": recipe.fingerprint_b,
        },
        "folds": {
            "k": recipe.folds,
            "seed": recipe.fold_seed,
            "tune": recipe.tune_fold,
            "test": recipe.test_fold,
        },
        "histogram": recipe.histogram_spec.model_dump(),
        "privacy": outcome.privacy,
        "tune": [_figures(r, v) for r, v in zip(outcome.tune, smooth, strict=True)],
        "test": {name: _figures(r) for name, r in outcome.test.items()},
        "accepted_sites": outcome.accepted_sites,
        "contributing_sites": outcome.contributing_sites,
        "refusals": outcome.refusals,
        "dropouts": outcome.dropouts,
        "rounds": [{**r, "candidates": [_lam(c) for c in r["candidates"]]} for r in outcome.rounds],
    }


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tune = report["tune"]
    grouped = report["groups"] is not None
    xs = list(range(len(tune))) if grouped else [t["lambda"] for t in tune]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    auroc = [t["auroc"] if t["auroc"] is not None else float("nan") for t in tune]
    auprc = [t["auprc"] if t["auprc"] is not None else float("nan") for t in tune]
    ax.plot(xs, auroc, "o-", label="AUROC (tuning fold)")
    if any(t.get("auroc_smoothed") is not None for t in tune):
        smooth = [t["auroc_smoothed"] if t["auroc_smoothed"] is not None else float("nan")
                  for t in tune]
        ax.plot(xs, smooth, "-", lw=2, alpha=0.7, label="AUROC through the noise (λ* rule)")
    ax.plot(xs, auprc, "s--", label="AUPRC (tuning fold)")
    star = report["lambda_star"]
    if not grouped:
        ax.axvline(star, color="grey", lw=0.8, ls=":", label=f"λ* = {star:g}")
        ax.set_xlabel("λ (0 = parent A, 1 = parent B)")
    else:
        ax.set_xticks(
            xs,
            [",".join(f"{v:g}" for v in t["lambda"].values()) for t in tune],
            rotation=90,
            fontsize=6,
        )
        ax.set_xlabel("λ per group (" + ",".join(report["groups"]) + ")")
    ax.set_ylabel("pooled metric")
    ax.set_title(f"{report['method']} merge, pooled over {len(report['contributing_sites'])} sites")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(outcome: TuningOutcome, out_dir: str | Path) -> Path:
    """Write report.json, curve.png and recipe.yaml into `out_dir` (atomically per run)."""
    from common.merge.config import MergeConfig

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = report_dict(outcome)
    recipe = outcome.recipe
    merge = MergeConfig.two_parent(
        recipe.parent_a, recipe.parent_b, recipe.method, outcome.lambda_star
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(merge.to_yaml())
        _plot(report, tmp / "curve.png")
        out.mkdir(exist_ok=True)
        for name in ("report.json", "recipe.yaml", "curve.png"):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _fmt(x, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _lam_text(lam) -> str:
    # Four significant digits: enough to tell candidates apart, short enough for a table cell
    # (report.json keeps the exact values).
    if isinstance(lam, dict):
        return " ".join(f"{k[:4]}={v:.4g}" for k, v in lam.items())
    return f"{lam:.4g}"


def print_table(report: dict, console=None) -> None:
    """The rich table of the tuning curve and the held-out comparison."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    star = report["lambda_star"]
    table = Table(title=f"λ search on the tuning fold ({report['method']}, {report['search']})")
    smoothed = any(t.get("auroc_smoothed") is not None for t in report["tune"])
    columns = ("λ", "AUROC", *(("smoothed",) if smoothed else ()), "95% CI", "AUPRC", "n",
               "positives", "sites")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("λ", "sites") else "left")
    for t in report["tune"]:
        ci = t["auroc_ci"]
        mark = " *" if t["lambda"] == star else ""
        table.add_row(
            _lam_text(t["lambda"]) + mark,
            _fmt(t["auroc"]),
            *((_fmt(t["auroc_smoothed"]),) if smoothed else ()),
            "—" if ci is None else f"{ci[0]:.3f}–{ci[1]:.3f}",
            _fmt(t["auprc"]),
            str(t["n"]),
            str(t["positives"]),
            str(len(t["sites"])),
        )
    console.print(table)
    test = Table(title="Held-out fold")
    for col in ("model", "λ", "AUROC", "AUPRC", "n"):
        test.add_column(col)
    for name, label in (
        ("lambda_star", "merge λ*"),
        ("parent_a", "parent A"),
        ("parent_b", "parent B"),
    ):
        t = report["test"][name]
        test.add_row(label, _lam_text(t["lambda"]), _fmt(t["auroc"]), _fmt(t["auprc"]), str(t["n"]))
    console.print(test)
    console.print(f"contributing sites: {', '.join(report['contributing_sites'])}")
    privacy = report.get("privacy") or {}
    if privacy.get("mode", "off") == "off":
        console.print("differential privacy: off (exact sums)")
    else:
        console.print(
            f"differential privacy: {privacy['mode']}, ε = {privacy['epsilon']:.3g}, "
            f"δ = {privacy['delta']:.0e} per run (noise σ {privacy['sigma_sum']:.3g} per count "
            "in the sum; CIs include it)"
        )
    for r in report["refusals"]:
        console.print(f"[yellow]refused[/] {r['site']} ({r['stage']}): {r['reason']}")
    for d in report["dropouts"]:
        console.print(f"[yellow]dropped[/] {d['site']} (round {d['round']}): {d['reason']}")

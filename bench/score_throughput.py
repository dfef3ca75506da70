"""Scoring throughput: YesNoScorer against the paper-parity path, measured in one run.

The parity path (generate two tokens, parse them, batches of fixed size in dataset order padded to
their longest) is what PatientDx ran; the scorer's gains must come from computing less (no
padding to speak of, no generation, answer-token rows only), so both run on the same
mixed-length stays, the same model and the same threads, alternately, best of `--repeats`.
On a shared machine use `--threads 1` and read `cpu_time_speedup` as well.
Targets on the ~30M model: speedup >= 2, scorer padding <= 10% of computed tokens.
The last line is one JSON object for the ~30M model.

    python bench/score_throughput.py [--stays 48] [--repeats 2] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.flower_runtime import set_offline_defaults  # noqa: E402

set_offline_defaults()

import numpy as np  # noqa: E402

from common.records import PatientRecord  # noqa: E402

_VOCAB_TEXT = (
    "The patient is diagnosed with sepsis acute kidney failure pneumonia heart shock . ; : "
    "chart events mesured are for Temperature Heart Rate pH mean amounts of medications "
    "administered during the episode Norepinephrine procedures performed Ventilation Dialysis "
    "outputs collected Urine glucose lactate creatinine sodium platelets insulin heparin "
    "vancomycin propofol fentanyl 0 1 2 3 4 5 6 7 8 9"
)
WORDS = _VOCAB_TEXT.split()  # noqa: SIM905 - one readable sentence, not 60 quoted words

# ~30M parameters with the small word vocabulary: 7 layers of hidden 512, MLP 2048, GQA 8/4.
MODEL_30M = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=7,
                 num_attention_heads=8, num_key_value_heads=4)


def make_stays(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[PatientRecord]:
    """Stays whose full prompts are spread uniformly over [lo, hi] tokens, in random order."""
    from common.scoring import PromptTemplate

    rng = np.random.default_rng(seed)
    overhead = len(PromptTemplate().encode(tokenizer, "", 0)[0])
    out = []
    for i in range(n):
        target = int(rng.integers(lo, hi + 1)) - overhead
        text = " ".join(rng.choice(WORDS, size=max(target, 1)))
        out.append(PatientRecord(stay_id=str(i), label=int(rng.random() < 0.2), text=text))
    return out


def measure(model, tokenizer, stays, batch_tokens: int, repeats: int) -> dict:
    import torch

    from common.scoring import ParityScorer, YesNoScorer

    longest = 512
    scorer = YesNoScorer(model, tokenizer, batch_tokens=batch_tokens, max_patient_tokens=1024)
    parity = ParityScorer(model, tokenizer, batch_size=max(1, batch_tokens // longest),
                          max_patient_tokens=1024)
    warm = stays[:4]
    scorer.score(scorer.prepare(warm))
    parity.run(warm)
    # Wall time is what a site sees; CPU time of this process is also kept because other jobs on
    # a shared box inflate wall time unevenly (it is the cleaner ratio with --threads 1).
    wall = {"scorer": [], "scorer_per_lambda": [], "parity": []}
    cpu = {"scorer": [], "parity": []}
    prepared = parity_result = log_odds = None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        prepared = scorer.prepare(stays)
        t1 = time.perf_counter()
        log_odds = scorer.score(prepared)
        c2, t2 = time.process_time(), time.perf_counter()
        parity_result = parity.run(stays)
        c3, t3 = time.process_time(), time.perf_counter()
        wall["scorer"].append(t2 - t0)
        wall["scorer_per_lambda"].append(t2 - t1)
        wall["parity"].append(t3 - t2)
        cpu["scorer"].append(c2 - c0)
        cpu["parity"].append(c3 - c2)
    best = {k: min(v) for k, v in wall.items()}
    agree = float(np.abs(log_odds - parity_result.log_odds).max())
    n = len(stays)
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "threads": torch.get_num_threads(),
        "stays": n,
        "real_tokens": int(prepared.lengths.sum()),
        "scorer_stays_per_s": n / best["scorer"],
        "scorer_per_lambda_stays_per_s": n / best["scorer_per_lambda"],
        "parity_stays_per_s": n / best["parity"],
        "speedup": best["parity"] / best["scorer"],
        "speedup_per_lambda": best["parity"] / best["scorer_per_lambda"],
        "cpu_time_speedup": min(cpu["parity"]) / min(cpu["scorer"]),
        "padding_fraction": prepared.padding_fraction,
        "parity_padding_fraction": parity_result.padding_fraction,
        "max_abs_log_odds_diff_vs_parity": agree,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stays", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--min-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="24 stays, 1 repeat (a busy machine)")
    args = ap.parse_args()
    if args.quick:
        args.stays, args.repeats = 24, 1

    import torch
    from transformers import AutoModelForCausalLM

    from common.tiny_models import build_tiny_llama, train_word_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = train_word_tokenizer([_VOCAB_TEXT])
    stays = make_stays(tokenizer, args.stays, args.min_tokens, args.max_tokens, seed=0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("tiny", {}), ("30M", MODEL_30M)):
            path = build_tiny_llama(Path(tmp) / name, tokenizer, seed=0, **overrides)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            r = measure(model, tokenizer, stays, args.batch_tokens, args.repeats)
            results[name] = r
            print(
                f"{name:>5} ({r['params_m']:.1f}M params, {r['stays']} stays, "
                f"{r['real_tokens']} tokens, {r['threads']} threads): "
                f"scorer {r['scorer_stays_per_s']:.2f} stays/s "
                f"({r['scorer_per_lambda_stays_per_s']:.2f} per extra λ, tokenized once), "
                f"parity {r['parity_stays_per_s']:.2f} stays/s, "
                f"speedup {r['speedup']:.2f}x ({r['speedup_per_lambda']:.2f}x per λ, "
                f"{r['cpu_time_speedup']:.2f}x in CPU time), "
                f"padding {100 * r['padding_fraction']:.1f}% "
                f"(parity {100 * r['parity_padding_fraction']:.1f}%), "
                f"max |Δ log-odds| vs parity first step {r['max_abs_log_odds_diff_vs_parity']:.1e}",
                flush=True,
            )
    print(json.dumps({"model": "30M", **results["30M"]}))


if __name__ == "__main__":
    main()

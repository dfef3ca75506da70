"""Benchmark: in-place SLERP switching versus the naive merge-save-reload path.

Two random Llama checkpoints of about 100M parameters (fp32) are built in a temporary
directory. Each path runs in its own subprocess so its peak RSS (VmHWM) is its own:

- switch: `InPlaceMerger(A, B, method="slerp")`, one warm-up `apply` (first touch of the
  memory-mapped parents and copy-on-write of the live weights), then the median seconds of
  `apply(λ)` over several λ values. In the same process, and interleaved with the switches,
  a plain `copy_` of parent A into the same live parameters gives the copy bandwidth.
- naive: `from_pretrained` both parents, SLERP their state dicts, `load_state_dict`,
  `save_pretrained`, and `from_pretrained` the result (median of `--naive-repeats` runs).

Bandwidth is counted in bytes that must cross memory, logical (not what the kernels happen to
stream): a switch reads A and B and writes θ, i.e. 3 × model bytes; a copy reads one and writes
one, i.e. 2 × model bytes. `switch_gbps = 3·model_bytes / switch_s`, `copy_gbps =
2·model_bytes / copy_s`, `bandwidth_fraction = switch_gbps / copy_gbps` (GB = 1e9 bytes).

Targets (issue 2): speedup ≥ 20, bandwidth_fraction ≥ 0.5, switch peak RSS ≤ 3 model sizes +
0.6 GB.

Large case (issue 15): two random Llama parents of TinyLlama's shape (1.1 B parameters, bf16,
~1 GB shards; bench/big_parents.py), generated once and cached (`--big-dir`). In its own
process, `InPlaceMerger` opens them and switches `--big-repeats` times while a thread samples
/proc/self/status every 5 ms. RSS is counted whole: anonymous memory (live model, buffers,
Python) plus the parents' mapped file pages the switch touched (page cache, reclaimable but
resident); `big_rss_gb` is the kernel's peak of that sum (VmHWM) over opening and switching.
Budget: live model in float32 + both parents' bf16 bytes + 0.6 GB. `big_switch_gbps` counts the
bytes a switch must move: both parents read once, the live model written once. A third process
measures `fedmerge merge` of the pair the same way (`big_merge_*`). Target: big_rss_gb ≤
big_budget_gb. Needs ~10 GB of RAM: run it under `flock /tmp/fedmerge-heavy.lock`.
The last line printed is one JSON object with the numbers.

    python bench/merge_switch.py            # ~100M parameters, then the 1.1 B pair
    python bench/merge_switch.py --small    # ~25M, when the machine is busy
    python bench/merge_switch.py --threads 1  # when other jobs share the cores
    python bench/merge_switch.py --skip-small --big-scale 0.1   # develop the large case small
    python bench/merge_switch.py --skip-small --big-shape 7b --device cuda \
        --parent-placement host --skip-merge   # a GPU: device peak vs live model + 1 GB
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.flower_runtime import set_offline_defaults  # noqa: E402

set_offline_defaults()

LAMBDAS = (0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6, 0.05)


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would
    inherit the peak of the process that forked it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def build_parents(root: Path, small: bool) -> tuple[Path, Path]:
    import itertools
    import string

    from common.tiny_models import build_tiny_llama, train_word_tokenizer

    vocab = 8192
    words = ["".join(p) for p in itertools.islice(
        itertools.product(string.ascii_lowercase, repeat=3), vocab + 200)]
    tok = train_word_tokenizer([" ".join(words)], vocab_size=vocab)
    shape = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=10,
                 num_attention_heads=12, num_key_value_heads=4)
    if small:
        shape.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4)
    return (build_tiny_llama(root / "parent_a", tok, seed=1, **shape),
            build_tiny_llama(root / "parent_b", tok, seed=2, **shape))


def child_switch(a: str, b: str, repeats: int) -> dict:
    import torch

    from common.merge.switch import InPlaceMerger

    t0 = time.perf_counter()
    merger = InPlaceMerger(a, b, method="slerp")
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merger.apply(0.5)
    first_s = time.perf_counter() - t0
    slots = merger._slots  # the bench reuses the same live tensors for the copy baseline
    model_bytes = sum(s.target.numel() * s.target.element_size() for s in slots)
    switch, copy = [], []
    with torch.no_grad():
        for i in range(repeats):
            lam = LAMBDAS[i % len(LAMBDAS)]
            t0 = time.perf_counter()
            merger.apply(lam)
            switch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for s in slots:
                s.target.copy_(s.a)
            copy.append(time.perf_counter() - t0)
    return {"init_s": init_s, "first_switch_s": first_s,
            "switch_s": statistics.median(switch), "copy_s": statistics.median(copy),
            "model_bytes": model_bytes, "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads()}


def child_naive(a: str, b: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from common.merge.methods.slerp import slerp_coefficients, slerp_dot

    logging.disable_progress_bar()
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ma = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32)
            mb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32)
            sa, sb = ma.state_dict(), mb.state_dict()
            merged = {}
            for k, x in sa.items():
                alpha, beta = slerp_coefficients(slerp_dot(x, sb[k]), 0.5)
                merged[k] = alpha * x + beta * sb[k]
            ma.load_state_dict(merged)
            ma.save_pretrained(tmp)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            times.append(time.perf_counter() - t0)
            del ma, mb, sa, sb, merged, reloaded
    return {"naive_s": statistics.median(times), "peak_rss_gb": peak_rss_gb()}


class PhasePeaks:
    """Peak resident memory per phase, sampled every 5 ms in a thread from /proc/self/status.

    RSS counts the live model and buffers (RssAnon) and every touched page of the memory-mapped
    parents (RssFile: page cache this process maps; reclaimable, but resident), so both are
    reported; VmHWM, the kernel's own peak of their sum, catches spikes between samples.
    """

    def __init__(self):
        import threading

        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> dict[str, float]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024 / 1e9
        return out

    def sample(self) -> None:
        now = self.read()
        peak = self.peaks.setdefault(self.phase, {})
        for k in ("VmRSS", "RssAnon", "RssFile"):
            peak[k] = max(peak.get(k, 0.0), now[k])

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    def enter(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self) -> dict:
        self.sample()
        self._stop.set()
        self._thread.join()
        return {"phases": self.peaks, "hwm_gb": self.read()["VmHWM"]}


def child_big(a: str, b: str, repeats: int, device: str = "cpu",
              placement: str = "auto") -> dict:
    """Open a large pair, switch it, and record time and memory by phase (on CUDA also the
    device's peak allocated bytes, the live model in float32 so the budget compares)."""
    import torch

    from common.merge.switch import InPlaceMerger

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peaks = PhasePeaks()
    peaks.enter("open")
    t0 = time.perf_counter()
    merger = InPlaceMerger(a, b, method="slerp", device=device, dtype=torch.float32,
                           parents=placement)
    sync()
    init_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peaks.enter("first_switch")
    t0 = time.perf_counter()
    merger.apply(0.5)
    sync()
    first_s = time.perf_counter() - t0
    peaks.enter("switch")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        merger.apply(LAMBDAS[i % len(LAMBDAS)])
        sync()
        times.append(time.perf_counter() - t0)
    mem = peaks.stop()
    out = {"init_s": init_s, "first_switch_s": first_s, "switch_s": statistics.median(times),
           **merger.memory, **mem, "threads": torch.get_num_threads(),
           "placement_reason": merger.placement_reason}
    if cuda:
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def child_merge(a: str, b: str, repeats: int) -> dict:
    """`fedmerge merge` of the large pair (SLERP, λ = 0.5), with its memory by phase."""
    from common.merge.config import MergeConfig
    from common.merge.writer import write_merge

    peaks = PhasePeaks()
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-merge-") as tmp:
        peaks.enter("merge")
        t0 = time.perf_counter()
        write_merge(MergeConfig.two_parent(a, b, "slerp", 0.5), Path(tmp) / "out",
                    shard_size="1GB")
        merge_s = time.perf_counter() - t0
        mem = peaks.stop()
    return {"merge_s": merge_s, **mem}


def run_child(mode: str, a: Path, b: Path | str, repeats: int, threads: int,
              scale: float = 1.0, extra: tuple[str, ...] = ()):
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(a), str(b), "--repeats", str(repeats),
         "--threads", str(threads), "--big-scale", str(scale), *extra],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{mode} subprocess failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def big_case(args) -> dict:
    """The large pair: build (or reuse) it, switch it, merge it; each in its own process."""
    root = Path(args.big_dir) if args.big_dir else (
        Path(tempfile.gettempdir()) / f"fedmerge-bench-big-{args.big_shape}-{args.big_scale:g}")
    t0 = time.perf_counter()
    a, b = map(Path, run_child("build-big", root, "-", 0, 0, args.big_scale,
                               ("--big-shape", args.big_shape)))
    print(f"large parents ready in {time.perf_counter() - t0:.1f} s under {root}", flush=True)
    sw = run_child("big", a, b, args.big_repeats, args.threads, args.big_scale,
                   ("--device", args.device, "--parent-placement", args.parent_placement))
    out = {"sw": sw}
    if not args.skip_merge and args.device == "cpu":
        out["merge"] = run_child("merge", a, b, 0, args.threads, args.big_scale)
    return out


def big_report(big: dict) -> dict:
    sw = big["sw"]
    live, parents = sw["live_bytes"], sw["parent_bytes"]
    budget = (live + parents) / 1e9 + 0.6
    moved = live + parents  # each switch reads both parents once and writes the live model
    ph = sw["phases"]
    result = {
        "big_params_m": round(live / 4 / 1e6, 1),
        "big_live_gb": round(live / 1e9, 3),
        "big_parents_gb": round(parents / 1e9, 3),
        "big_rss_gb": round(sw["hwm_gb"], 3),
        "big_budget_gb": round(budget, 3),
        "big_open_rss_gb": round(ph["open"]["VmRSS"], 3),
        "big_switch_rss_gb": round(max(ph["first_switch"]["VmRSS"], ph["switch"]["VmRSS"]), 3),
        "big_switch_anon_gb": round(max(ph["first_switch"]["RssAnon"],
                                        ph["switch"]["RssAnon"]), 3),
        "big_switch_file_gb": round(max(ph["first_switch"]["RssFile"],
                                        ph["switch"]["RssFile"]), 3),
        "big_open_s": round(sw["init_s"], 2),
        "big_first_switch_s": round(sw["first_switch_s"], 3),
        "big_switch_s": round(sw["switch_s"], 3),
        "big_switch_gbps": round(moved / sw["switch_s"] / 1e9, 2),
    }
    print(f"large pair: {result['big_params_m']}M parameters, parents {parents / 1e9:.2f} GB "
          f"bf16 in total, live model {live / 1e9:.2f} GB fp32")
    print(f"  open {result['big_open_s']} s, first switch {result['big_first_switch_s']} s, "
          f"switch {result['big_switch_s']} s ({result['big_switch_gbps']} GB/s of parents "
          "read + live written)")
    for phase, p in ph.items():
        print(f"  {phase:>12}: peak RSS {p['VmRSS']:.2f} GB = anon {p['RssAnon']:.2f} "
              f"+ mapped file pages {p['RssFile']:.2f} (sampled every 5 ms)")
    print(f"  peak RSS (VmHWM, anon + file pages) {result['big_rss_gb']:.2f} GB, budget "
          f"{budget:.2f} GB = live + parents + 0.6")
    if "device_peak_bytes" in sw:
        result["big_device_peak_gb"] = round(sw["device_peak_bytes"] / 1e9, 3)
        result["big_device_budget_gb"] = round(live / 1e9 + 1.0, 3)
        result["big_placement"] = sw["placement"]
        print(f"  device: parents {sw['placement']} ({sw['placement_reason']}); peak allocated "
              f"{result['big_device_peak_gb']} GB (target <= live + 1 GB = "
              f"{result['big_device_budget_gb']} GB)")
    if "merge" in big:
        mg = big["merge"]
        mp = mg["phases"]["merge"]
        result.update({"big_merge_s": round(mg["merge_s"], 1),
                       "big_merge_rss_gb": round(mg["hwm_gb"], 3),
                       "big_merge_anon_gb": round(mp["RssAnon"], 3),
                       "big_merge_file_gb": round(mp["RssFile"], 3)})
        print(f"  fedmerge merge (slerp, bf16 out): {result['big_merge_s']} s, peak RSS "
              f"{result['big_merge_rss_gb']:.2f} GB (anon {mp['RssAnon']:.2f} + file pages "
              f"{mp['RssFile']:.2f})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="~25M parameters instead of ~100M")
    parser.add_argument("--repeats", type=int, default=10, help="timed switches")
    parser.add_argument("--naive-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in both paths (0: torch's default); 1 avoids "
                        "OpenMP stalls when other jobs load the cores")
    parser.add_argument("--big-scale", type=float, default=1.0,
                        help="large case size: 1 = TinyLlama's 1.1B; 0.1 keeps the tensor "
                        "shapes with fewer layers and a smaller vocabulary; 0 skips it")
    parser.add_argument("--big-dir", default="", help="where the large parents are cached "
                        "(default: the temp dir; reused when complete)")
    parser.add_argument("--big-repeats", type=int, default=5)
    parser.add_argument("--skip-merge", action="store_true",
                        help="large case: skip measuring `fedmerge merge`")
    parser.add_argument("--skip-small", action="store_true", help="only the large case")
    parser.add_argument("--big-shape", choices=("tinyllama", "7b"), default="tinyllama",
                        help="large case shape: TinyLlama 1.1B, or Llama-2-7B's (for a GPU)")
    parser.add_argument("--device", default="cpu", help="large case switch device (cuda: "
                        "also reports the device's peak allocated memory)")
    parser.add_argument("--parent-placement", choices=("auto", "device", "host"),
                        default="auto", help="large case on CUDA: where the parents live")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "A", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, a, b = args.child
        if mode == "build":
            print(json.dumps([str(p) for p in build_parents(Path(a), b == "small")]))
            return
        if mode == "build-big":
            from bench.big_parents import LLAMA_7B, TINYLLAMA, build_pair

            shape = LLAMA_7B if args.big_shape == "7b" else TINYLLAMA
            print(json.dumps([str(p) for p in build_pair(Path(a), args.big_scale, shape)]))
            return
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if mode == "big":
            print(json.dumps(child_big(a, b, args.repeats, args.device, args.parent_placement)))
            return
        fn = {"switch": child_switch, "naive": child_naive, "merge": child_merge}[mode]
        print(json.dumps(fn(a, b, args.repeats)))
        return

    result: dict = {}
    if not args.skip_small:
        result.update(small_case(args))
    if args.big_scale > 0:
        result.update(big_report(big_case(args)))
    print(json.dumps(result))


def small_case(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedmerge-bench-") as tmp:
        t0 = time.perf_counter()
        # Built in a subprocess too: this process stays small and imports no torch.
        a, b = map(Path, run_child("build", Path(tmp), "small" if args.small else "full", 0, 0))
        print(f"built two parents in {time.perf_counter() - t0:.1f} s", flush=True)
        sw = run_child("switch", a, b, args.repeats, args.threads)
        nv = run_child("naive", a, b, args.naive_repeats, args.threads)
    model_gb = sw["model_bytes"] / 1e9
    switch_gbps = 3 * sw["model_bytes"] / sw["switch_s"] / 1e9
    copy_gbps = 2 * sw["model_bytes"] / sw["copy_s"] / 1e9
    result = {
        "switch_s": round(sw["switch_s"], 4),
        "naive_s": round(nv["naive_s"], 3),
        "speedup": round(nv["naive_s"] / sw["switch_s"], 1),
        "switch_gbps": round(switch_gbps, 2),
        "copy_gbps": round(copy_gbps, 2),
        "bandwidth_fraction": round(switch_gbps / copy_gbps, 3),
        "switch_peak_rss_gb": round(sw["peak_rss_gb"], 3),
        "naive_peak_rss_gb": round(nv["peak_rss_gb"], 3),
        "model_gb": round(model_gb, 3),
        "params_m": round(sw["model_bytes"] / 4 / 1e6, 1),
        "switch_init_s": round(sw["init_s"], 2),
        "first_switch_s": round(sw["first_switch_s"], 3),
        "threads": sw["threads"],
    }
    rss_budget = 3 * model_gb + 0.6
    print(f"model: {result['params_m']}M parameters, {model_gb:.3f} GB fp32")
    print(f"in-place SLERP switch: {result['switch_s']:.4f} s per switch "
          f"(construction {result['switch_init_s']} s, first switch {result['first_switch_s']} s)")
    print(f"naive (2x from_pretrained, merge, save_pretrained, reload): {result['naive_s']:.2f} s")
    print(f"speedup: {result['speedup']}x (target >= 20)")
    print(f"bandwidth: switch {switch_gbps:.1f} GB/s vs copy_ {copy_gbps:.1f} GB/s = "
          f"{result['bandwidth_fraction']:.2f} (target >= 0.5)")
    print(f"peak RSS: switch {result['switch_peak_rss_gb']:.2f} GB "
          f"(budget {rss_budget:.2f} GB), naive {result['naive_peak_rss_gb']:.2f} GB")
    return result


if __name__ == "__main__":
    main()

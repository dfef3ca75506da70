"""SecAgg+ overhead per round against the number of sites, with the vector the search sends.

Overhead = a masked round (`server.secagg.secure_round`, four SecAgg+ stages) minus a plain
round (one request per site, the same vectors summed in the clear), both measured in the same
run over the same sites and vectors (the two sums are checked equal), median of `--repeats`
rounds after `--warmup` rounds per size. The vector is the tuning round's: candidates x 2
classes x bins from `server.recipe.TuningRecipe`'s defaults (11 x 2 x 2048 = 45,056 entries)
unless `--candidates`/`--bins` say otherwise. The protocol path is production code: the
coordinator's `secure_round` (its `_SurvivorsWorkflow`, shares and threshold from
`SecAggSettings.shares_for/threshold_for`), the site's guard (`checked_secaggplus_mod` with
`GuardPolicy(min_sites=3)`) and fedmerge's ChaCha20 masks and Shamir secret sharing
(`common.secure_masks.install()`, `common.secure_shamir`); only the histograms are made up.

Transports (`--engine`):
- `loopback` (the headline): an in-process Grid that serializes every message through
  Flower's protobuf serde (the bytes a SuperLink carries) and hands it synchronously to a real
  ClientApp with that site's own Context. No Ray, no polling: it measures the protocol's
  compute with all sites run one after the other, i.e. the CPU a round costs. It times each
  site's handler too, so it also reports the coordinator's share (`coord_s`) and `par_est_s`:
  the overhead with every site on its own machine (coordinator + the slowest site of each
  stage; network latency excluded).
- `simulation`: Flower's simulation engine (Ray actors, as `bench/secagg_overhead.py`). It
  agreed with the loopback from 10 sites on (50 sites: 84 s vs 80 s); at 3 sites it adds about
  0.25 s of Ray and reply polling (0.1 s per stage, four stages against the plain round's one).

Variants (`--variants graph/shamir`):
- graph `full`: the recipe default, num_shares=1.0 (every site shares with every other),
  threshold max(round(0.67 x shares), strict majority). graph `majority`: the smallest
  neighbourhood the site guard accepts, shares = the smallest odd count >= n//2 + 2 (27 at 50
  sites), threshold = a strict majority of the n sampled sites (26), so one dropout per
  neighbourhood is survivable. A SecAgg+-style O(log n) neighbourhood (2*log2(n)+1 shares, 13
  at 50 sites) is impossible without weakening the guard: it demands threshold >= a strict
  majority of the SAMPLED sites, threshold <= shares and 2*threshold > shares, so shares >=
  n//2 + 1; the coordinator's `threshold_for` already refuses it (printed at the start).
- shamir `fast`: fedmerge's `common.secure_shamir`, i.e. production (`install()` puts it at
  Flower's call sites). shamir `flower`: what-if, Flower's own Shamir (pycryptodome, pure-Python
  GF(2^128)), the same scheme and byte format, swapped back in for this process only; it shows
  what the round cost before fedmerge replaced it. Loopback only (the simulation's sites run in
  Ray actors, where the guard installs production).

Findings now (2 cores, quiet; loopback; full/fast): the search sends 11 x 2 x 32 = 704 entries
per site (32 reference-placed bins, issue 12) and keys are agreed with X25519: 3 / 10 / 25 / 50
sites -> overhead 0.028 / 0.14 / 0.33 / 1.42 s per round, par_est 0.02 / 0.08 / 0.10 / 0.32 s
(with the machine shared at load ~4: 0.035 / 0.25 / 0.60 / 2.0 s). At 50 sites what is
left is Shamir shares at the sites (~0.5 s), X25519 exchanges (~0.35 s), Fernet (~0.5 s),
masks (~0.35 s) and Flower's message serialization (~0.5 s), all O(n^2). Against FHAUC
(0.68 s for 100 parties): ~2x at half the parties serially on one machine, ~0.5x with each
site on its own machine.

Findings before (2,048 uniform bins = 45,056 entries, P-384 key agreement):
3 / 10 / 25 / 50 sites -> overhead 0.09 / 0.32 / 2.2 / 7.8 s per round, coordinator part
0.03 / 0.04 / 0.12 / 0.35 s, par_est 0.06 / 0.09 / 0.39 / 0.73 s: 3.9x over the 2 s target at
50 sites in CPU (the two measured 50-site rounds: 9.8 and 6.3 s), within it with every site on
its own machine. The majority graph: 3.8 s at 50 sites (par_est 0.40 s).
What-if full/flower (Flower's pycryptodome Shamir, what production ran before): 0.12 / 1.05 /
13 / 78 s, coordinator 30.5 s and par_est 33 s at 50 sites, cubic in n; majority/flower 28.5 s.
cProfile of one such 50-site round (81 s, `--profile 50`): Shamir was 87% of it, split 31 s at
the sites (each site shares its 32-byte mask seed and its 306-byte PEM private key: 23 chunks x
50 shares x 33 Horner steps, every GF(2^128) product a 128-step Python loop) and 40 s at the
coordinator (`combine_shares` interpolates every site's seed from all 50 shares, re-deriving
the Lagrange coefficients with 50 inversions per 16-byte chunk); then ECDH P-384 4.4 s (4,900
agreements, half of it re-parsing the site's own PEM key each time), ChaCha20 masks 1.2 s
(2,550 streams of 45k words: the only part that grows with the vector), Fernet 0.5 s.
`common.secure_shamir` (same shares, see its docstring) removes almost all of the Shamir part.
(The simulation engine's agreement above was measured with Flower's Shamir.)

Against the anchor "a homomorphic-encryption AUROC system (FHAUC) reports 0.68 s for 100
parties": fedmerge at 50 parties costs 7.8 s of compute (11.5x the anchor at half the parties;
80 s with Flower's Shamir) and ~0.7 s of wall time with parallel sites (about the anchor, at
half the parties). The reasons: FHAUC aggregates ~100 thresholds per party; fedmerge sums
45,056 integers per site (2048 bins x 2 classes x 11 candidates) under pairwise masks, O(n^2)
ChaCha20 streams over the whole vector, plus Flower's SecAgg+ key material (O(n^2) ECDH,
O(n^2) Shamir shares, whose pure-Python cost in Flower made the round O(n^3)). With fedmerge's
Shamir the remaining serial cost at 50 sites is ECDH (~5 s, O(n^2)) and masks (~1.5 s,
O(n^2 x vector)); there fewer bins start to matter (they shrink the vector and the masks
linearly).

    python bench/secagg_scale.py                          # 3,10,25,50 sites, loopback
    python bench/secagg_scale.py --sites 3,10             # quick
    python bench/secagg_scale.py --engine both            # also Flower's simulation engine
    python bench/secagg_scale.py --sites '' --profile 25  # cProfile one masked round only

Last line: one JSON object (`overhead_s_at_50` for full/fast on the loopback, per-size
overheads per engine and variant, par_est and coordinator parts, vector length, method).
Target: overhead_s_at_50 <= 2.0 s.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.flower_runtime import set_offline_defaults  # noqa: E402

set_offline_defaults()

import numpy as np  # noqa: E402

from common.secure_masks import SHAMIR_TARGETS as PRODUCTION_SHAMIR  # noqa: E402
from common.secure_shamir import clear_cache  # noqa: E402

MIN_SITES = 3  # the site guard's policy and the coordinator's min_sites
TARGET_S = 2.0
FHAUC_S, FHAUC_PARTIES = 0.68, 100
PLAIN_KEY = "bench.plain"
STAGE_PLAIN = "plain"


# --- what the sites send ------------------------------------------------------------------


def recipe_shape() -> tuple[int, int]:
    """(candidates per round, bins) of the default recipe's grid search, at the larger of the
    two default specs (32 bins for exact sums; runs with noise use 8, a shorter vector)."""
    from common.metrics import FEDERATED_HISTOGRAM
    from server.recipe import TuningRecipe

    search = TuningRecipe.model_fields["search"].default
    candidates = min(search.grid_points, search.max_candidates_per_round)
    return candidates, FEDERATED_HISTOGRAM.bins


def site_histograms(node_id: int, rnd: int, candidates: int, bins: int):
    rng = np.random.default_rng([node_id & 0xFFFFFFFF, rnd])
    counts = rng.integers(0, 50, (candidates, 2, bins), dtype=np.int64)
    return [(counts[c, 0], counts[c, 1]) for c in range(candidates)]


def make_site_app():
    """A site: the real SecAgg+ guard on `train` (fedmerge's masks), a plain `query` twin."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from client.secagg_guard import GuardPolicy, checked_secaggplus_mod

    app = ClientApp()
    guard = checked_secaggplus_mod(
        lambda context: GuardPolicy(site=f"site-{context.node_id}", min_sites=MIN_SITES)
    )

    @app.train(mods=[guard])
    def train(msg, context):
        from client.client_app import histogram_reply, read_instructions

        instr = read_instructions(msg)
        bins = instr.histogram.bins
        hists = site_histograms(context.node_id, instr.round, len(instr.candidates), bins)
        return histogram_reply(msg, hists, bins)

    @app.query()
    def query(msg, context):
        from common.secure_sum import encode_histograms

        cfg = msg.content.config_records["bench"]
        bins = int(cfg["bins"])
        hists = site_histograms(context.node_id, int(cfg["round"]), int(cfg["candidates"]), bins)
        vec = encode_histograms(hists, bins)
        return Message(RecordDict({PLAIN_KEY: ArrayRecord({"v": Array(vec)})}), reply_to=msg)

    return app


# --- the two rounds, as the coordinator runs them -------------------------------------------


def instructions(rnd: int, candidates: int, bins: int, sites: int):
    from common.metrics import HistogramSpec
    from common.protocol import RoundInstructions

    return RoundInstructions(
        round=rnd,
        stage="tune",
        recipe_fingerprint="bench",
        parent_fingerprints=("a", "b"),
        method="linear",
        candidates=[i / max(candidates - 1, 1) for i in range(candidates)],
        fold=0,
        folds=2,
        histogram=HistogramSpec(bins=bins),
        sites=sites,
    )


def plain_round(grid, nodes, rnd: int, candidates: int, bins: int) -> np.ndarray:
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType

    content = RecordDict(
        {"bench": ConfigRecord({"round": rnd, "candidates": candidates, "bins": bins})}
    )
    msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=600))
    assert len(replies) == len(nodes) and not any(r.has_error() for r in replies)
    return sum(r.content.array_records[PLAIN_KEY]["v"].numpy() for r in replies)


def masked_round(grid, context, nodes, rnd, candidates, bins, settings) -> np.ndarray:
    from server.secagg import secure_round

    out = secure_round(
        grid, context, node_ids=list(nodes), settings=settings, min_sites=MIN_SITES,
        instructions=instructions(rnd, candidates, bins, len(nodes)),
    )
    assert sorted(out.contributors) == sorted(nodes), out.failures
    return np.concatenate([np.concatenate([p, n]) for p, n in out.histograms]).astype(np.float64)


def majority_shares(sites: int) -> int:
    """Smallest odd share count >= n//2 + 2: the smallest neighbourhood the guard accepts
    that still survives one dropout per neighbourhood."""
    s = min(sites // 2 + 2, sites)
    return s if s == sites or s % 2 else s + 1


def graph_settings(graph: str, sites: int, timeout: float):
    from server.recipe import SecAggSettings

    if graph == "full":
        return SecAggSettings(timeout=timeout)
    if graph == "majority":
        return SecAggSettings(num_shares=max(majority_shares(sites), 3), timeout=timeout)
    raise ValueError(f"--graphs: unknown graph {graph!r}, expected full or majority")


def log_neighbourhood_refusal(sites: int) -> str:
    """What the coordinator says to a SecAgg+-style O(log n) neighbourhood."""
    from common.errors import FedmergeError
    from server.recipe import SecAggSettings

    shares = 2 * math.ceil(math.log2(sites)) + 1
    settings = SecAggSettings(num_shares=shares)
    try:
        t = settings.threshold_for(sites, MIN_SITES)
    except FedmergeError as exc:
        return f"num_shares={shares}: refused: {exc}"
    return f"num_shares={shares}: accepted as {settings.shares_for(sites)} shares, threshold {t}"


# --- Shamir: fedmerge's (production) or Flower's (what-if) ---------------------------------


def use_shamir(kind: str) -> None:
    """Which Shamir Flower's SecAgg+ calls in THIS process (coordinator and loopback sites).

    `fast`: fedmerge's `common.secure_shamir`, what `common.secure_masks.install()` puts at the
    call sites in production. `flower`: Flower's own pycryptodome functions at the same call
    sites (the cost before fedmerge replaced them). `secure_round` and the site guard call
    `install()` (per round and per message), so the what-if swaps the table `install()` reads,
    not the call sites themselves; the masks stay fedmerge's either way.
    """
    from flwr.common.secure_aggregation.crypto import shamir

    from common import secure_masks

    if kind == "fast":
        secure_masks.SHAMIR_TARGETS = PRODUCTION_SHAMIR
    elif kind == "flower":
        secure_masks.SHAMIR_TARGETS = tuple(
            (module, name, getattr(shamir, name)) for module, name, _ in PRODUCTION_SHAMIR
        )
    else:
        raise ValueError(f"shamir {kind!r}: expected fast or flower")
    secure_masks.install()


# --- transports -----------------------------------------------------------------------------


class _Clock:
    """Seconds each site spent per stage of one round (loopback only)."""

    def __init__(self):
        self.entries: list[tuple[str, int, float]] = []
        self.bytes = 0

    def take(self) -> tuple[list[tuple[str, int, float]], int]:
        out, nbytes = self.entries, self.bytes
        self.entries, self.bytes = [], 0
        return out, nbytes


def loopback_grid(app, node_ids):
    """simulation.loopback_grid's in-process Grid (messages serialized as on the wire), with
    every site's handler time and the bytes on `grid.clock`."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from simulation.loopback_grid import LoopbackGrid

    clock = _Clock()

    def on_deliver(msg, seconds: float, nbytes: int) -> None:
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = str(cfg[Key.STAGE]) if cfg is not None else STAGE_PLAIN
        clock.entries.append((stage, msg.metadata.dst_node_id, seconds))
        clock.bytes += nbytes

    grid = LoopbackGrid({n: app for n in node_ids}, on_deliver=on_deliver)
    grid.clock = clock
    return grid


def _set_task_identity() -> None:
    """Messages take their run and sender from TaskIdentity, as run_simulation sets it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _server_context():
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


# --- measurement ----------------------------------------------------------------------------


def parse_variant(name: str) -> tuple[str, str]:
    """`graph/shamir`, e.g. `full/fast` (production), `majority/flower` (what-if)."""
    graph, _, shamir = name.partition("/")
    shamir = shamir or "fast"
    if graph not in ("full", "majority") or shamir not in ("flower", "fast"):
        raise ValueError(f"variant {name!r}: expected (full|majority)/(flower|fast)")
    return graph, shamir


def _parallel_estimate(wall: float, entries) -> tuple[float, float]:
    """(coordinator seconds, wall seconds if every site ran on its own machine)."""
    site_total = sum(dt for _, _, dt in entries)
    slowest: dict[str, float] = {}
    for stage, _, dt in entries:
        slowest[stage] = max(slowest.get(stage, 0.0), dt)
    server = wall - site_total
    return server, server + sum(slowest.values())


def measure(grid, context, all_nodes, sizes, variants, args, clock=None) -> list[dict]:
    """Per size: warm-up rounds, then `repeats` x (plain round, one masked round per variant),
    interleaved so that load on the machine hits every path alike."""
    rows: list[dict] = []
    rnd = 0
    for n in sizes:
        nodes = sorted(all_nodes)[:n]
        times: dict[str, list[tuple[float, float, float, int]]] = {STAGE_PLAIN: []}
        times.update({v: [] for v in variants})
        for rep in range(args.warmup + args.repeats):
            rnd += 1
            results = {}
            for name in [STAGE_PLAIN, *variants]:
                if clock is not None:
                    clock.take()
                t0 = time.perf_counter()
                if name == STAGE_PLAIN:
                    results[name] = plain_round(grid, nodes, rnd, args.candidates, args.bins)
                else:
                    graph, shamir = parse_variant(name)
                    use_shamir(shamir)
                    clear_cache()  # fedmerge's Shamir pays its interpolation once per round
                    t0 = time.perf_counter()
                    results[name] = masked_round(
                        grid, context, nodes, rnd, args.candidates, args.bins,
                        graph_settings(graph, n, args.timeout),
                    )
                    use_shamir("fast")
                wall = time.perf_counter() - t0
                server, par, nbytes = wall, wall, 0
                if clock is not None:
                    entries, nbytes = clock.take()
                    server, par = _parallel_estimate(wall, entries)
                if rep >= args.warmup:
                    times[name].append((wall, server, par, nbytes))
            for v in variants:  # the masked sum is the plain sum, exactly
                np.testing.assert_array_equal(results[v], results[STAGE_PLAIN])
            label = "warm-up" if rep < args.warmup else f"rep {rep - args.warmup}"
            print(f"  {n} sites, {label}: " + ", ".join(
                f"{k} {v[-1][0]:.2f} s" for k, v in times.items() if v and rep >= args.warmup
            ), flush=True)
        med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in times.items()}
        plain = med[STAGE_PLAIN]
        row = {
            "sites": n,
            "plain_s": plain[0],
            "plain_parallel_est_s": plain[2],
            "plain_bytes": int(plain[3]),
            "all_plain_s": [round(x[0], 4) for x in times[STAGE_PLAIN]],
        }
        for v in variants:
            settings = graph_settings(parse_variant(v)[0], n, args.timeout)
            row[v] = {
                "shares": settings.shares_for(n),
                "threshold": settings.threshold_for(n, MIN_SITES),
                "masked_s": med[v][0],
                "overhead_s": med[v][0] - plain[0],
                "per_site_s": (med[v][0] - plain[0]) / n,
                "coordinator_s": med[v][1] - plain[1] if clock else None,
                "parallel_est_overhead_s": med[v][2] - plain[2] if clock else None,
                "bytes": int(med[v][3]),
                "all_masked_s": [round(x[0], 4) for x in times[v]],
            }
        rows.append(row)
    return rows


def run_loopback(sizes, variants, args) -> list[dict]:
    from server.grid import CoordinatorGrid

    _set_task_identity()
    nodes = [1000 + i for i in range(max(sizes))]
    grid = loopback_grid(make_site_app(), nodes)
    return measure(CoordinatorGrid(grid), _server_context(), nodes, sizes, variants, args,
                   grid.clock)


def run_on_simulation(sizes, variants, args) -> list[dict]:
    """The same measurement on Flower's simulation engine (Ray actors). Sites run in other
    processes (Ray actors), so only the production Shamir (`fast`) is measured here."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from server.grid import CoordinatorGrid

    rows: list[dict] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        grid = CoordinatorGrid(grid)
        while len(list(grid.get_node_ids())) < max(sizes):
            time.sleep(0.2)
        rows.extend(measure(grid, context, list(grid.get_node_ids()), sizes, variants, args))

    run_simulation(
        server_app=server_app,
        client_app=make_site_app(),
        num_supernodes=max(sizes),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False},
        },
    )
    if len(rows) != len(sizes):
        raise SystemExit("simulation: the ServerApp did not finish every size (see its log)")
    return rows


# --- profile --------------------------------------------------------------------------------

# (label, path suffix, function): cumulative seconds of these calls in one masked round.
PROFILE_PARTS = [
    ("site: Shamir shares (fedmerge create_shares)", "common/secure_shamir.py", "create_shares"),
    ("site: Shamir shares (Flower create_shares)", "crypto/shamir.py", "create_shares"),
    ("coordinator: Shamir combine (fedmerge combine_shares)", "common/secure_shamir.py",
     "combine_shares"),
    ("coordinator: Shamir combine (Flower combine_shares)", "crypto/shamir.py",
     "combine_shares"),
    ("site: ECDH P-384 + HKDF (generate_shared_key)", "symmetric_encryption.py",
     "generate_shared_key"),
    ("  of which PEM private-key parsing", "secure_aggregation/secaggplus_utils.py", "_x"),
    ("site: Fernet encrypt shares", "symmetric_encryption.py", "encrypt"),
    ("site: Fernet decrypt shares", "symmetric_encryption.py", "decrypt"),
    ("site: key pairs (generate_key_pairs)", "primitives/asymmetric.py", "generate_key_pairs"),
    ("both: ChaCha20 masks (crypto_rand_gen)", "common/secure_masks.py", "crypto_rand_gen"),
    ("both: loopback wire (message_to_proto)", "flwr/common/serde.py", "message_to_proto"),
    ("both: loopback wire (message_from_proto)", "flwr/common/serde.py", "message_from_proto"),
]


def profile_round(sites: int, variant: str, args, top: int = 12) -> dict:
    """cProfile one masked round at `sites` (after a warm-up round) on the loopback. Shamir
    runs in Flower's thread pool, which cProfile does not see: its functions' cumulative
    time is still their wall time (the main thread waits in them)."""
    import cProfile
    import io
    import pstats

    from server.grid import CoordinatorGrid

    _set_task_identity()
    graph, shamir = parse_variant(variant)
    nodes = [1000 + i for i in range(sites)]
    grid = CoordinatorGrid(loopback_grid(make_site_app(), nodes))
    ctx = _server_context()
    settings = graph_settings(graph, sites, args.timeout)
    use_shamir(shamir)
    try:
        masked_round(grid, ctx, nodes, 1, args.candidates, args.bins, settings)  # warm-up
        clear_cache()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        masked_round(grid, ctx, nodes, 2, args.candidates, args.bins, settings)
        prof.disable()
        wall = time.perf_counter() - t0
    finally:
        use_shamir("fast")
    stats = pstats.Stats(prof)
    parts = {}
    for label, suffix, func in PROFILE_PARTS:
        if func == "_x":  # Flower re-parses the PEM private key before every agreement
            hits = [v for (_, _, name), v in stats.stats.items() if "load_pem_private" in name]
        else:
            hits = [v for (path, _, name), v in stats.stats.items()
                    if name == func and path.replace("\\", "/").endswith(suffix)]
        if hits:
            parts[label] = (sum(v[3] for v in hits), sum(v[1] for v in hits))
    print(f"\nprofile: one masked round, {sites} sites, {variant} (shares "
          f"{settings.shares_for(sites)}, threshold {settings.threshold_for(sites)}), "
          f"{args.candidates * 2 * args.bins} entries/site: {wall:.2f} s under cProfile")
    for label, (cum, calls) in parts.items():
        print(f"  {cum:8.2f} s {100 * cum / wall:5.1f}%  {calls:6d} calls  {label}")
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = buf.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(lines[start : start + top + 1]))
    return {
        "sites": sites, "variant": variant, "round_s_under_cprofile": round(wall, 3),
        "parts_s": {label: round(cum, 3) for label, (cum, _) in parts.items()},
    }


# --- report ---------------------------------------------------------------------------------


def print_table(engine: str, rows: list[dict], variants: list[str], vector_len: int) -> None:
    print(f"\n{engine}: {vector_len} entries per site, median of the measured repeats")
    head = (f"{'sites':>5} {'variant':>15} {'shares':>6} {'thr':>4} {'plain_s':>8} "
            f"{'masked_s':>9} {'overhead_s':>10} {'per_site_s':>10}")
    if engine == "loopback":
        head += f" {'coord_s':>8} {'par_est_s':>9} {'MB/round':>8}"
    print(head)
    for r in rows:
        for v in variants:
            x = r[v]
            line = (f"{r['sites']:>5} {v:>15} {x['shares']:>6} {x['threshold']:>4} "
                    f"{r['plain_s']:>8.3f} {x['masked_s']:>9.3f} {x['overhead_s']:>10.3f} "
                    f"{x['per_site_s']:>10.4f}")
            if engine == "loopback":
                line += (f" {x['coordinator_s']:>8.3f} {x['parallel_est_overhead_s']:>9.3f} "
                         f"{x['bytes'] / 1e6:>8.1f}")
            print(line)
    if engine == "loopback":
        print("  coord_s: the coordinator's part of the overhead; par_est_s: the overhead with "
              "every site on its own machine (coordinator + slowest site per stage)")


def _rounded(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,10,25,50", help="Comma-separated site counts.")
    ap.add_argument("--engine", choices=["loopback", "simulation", "both"], default="loopback")
    ap.add_argument(
        "--variants", default="full/fast,majority/fast,full/flower,majority/flower",
        help="graph/shamir pairs; graph: full (the recipe) or majority (smallest neighbourhood "
        "the guard accepts); shamir: fast (fedmerge's, production) or flower (Flower's "
        "pycryptodome Shamir, what-if). The simulation engine runs the fast ones only.",
    )
    ap.add_argument("--repeats", type=int, default=2, help="Measured rounds per size (median).")
    ap.add_argument("--warmup", type=int, default=1, help="Unmeasured rounds per size first.")
    ap.add_argument("--candidates", type=int, default=None, help="Default: the recipe's grid.")
    ap.add_argument("--bins", type=int, default=None, help="Default: the recipe's bins.")
    ap.add_argument("--timeout", type=float, default=600.0, help="SecAgg+ stage timeout (s).")
    ap.add_argument("--profile", type=int, default=0, metavar="SITES",
                    help="Also cProfile one masked round per --profile-variants at SITES.")
    ap.add_argument("--profile-variants", default="full/fast,full/flower")
    args = ap.parse_args()
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cands, bins = recipe_shape()
    args.candidates = args.candidates or cands
    args.bins = args.bins or bins
    if args.repeats < 2:
        ap.error("--repeats: expected at least 2 measured rounds per size")
    sizes = [int(s) for s in args.sites.split(",") if s.strip()]
    if any(n < MIN_SITES for n in sizes):
        ap.error(f"--sites: every size must be at least {MIN_SITES} (the guard's min_sites)")
    try:
        variants = [v for v in args.variants.split(",") if v]
        for v in variants + args.profile_variants.split(","):
            parse_variant(v)
    except ValueError as exc:
        ap.error(str(exc))
    vector_len = args.candidates * 2 * args.bins
    engines = ["loopback", "simulation"] if args.engine == "both" else [args.engine]
    print(f"SecAgg+ scale: {args.candidates} candidates x 2 x {args.bins} bins = {vector_len} "
          f"entries/site; sites {sizes}; variants {variants}; engines {engines}; "
          f"{args.warmup} warm-up + {args.repeats} measured rounds per size")
    for n in sizes:
        print(f"  O(log n) neighbourhood at {n} sites: {log_neighbourhood_refusal(n)}")

    results: dict[str, list[dict]] = {}
    ran: dict[str, list[str]] = {}
    for engine in engines if sizes else []:
        ran[engine] = variants if engine == "loopback" else [
            v for v in variants if parse_variant(v)[1] == "fast"
        ]
        print(f"\n[{engine}]", flush=True)
        t0 = time.perf_counter()
        fn = run_loopback if engine == "loopback" else run_on_simulation
        results[engine] = fn(sizes, ran[engine], args)
        print(f"  ({engine}: {time.perf_counter() - t0:.1f} s in all)")
    for engine, rows in results.items():
        print_table(engine, rows, ran[engine], vector_len)

    profiles = [profile_round(args.profile, v, args) for v in args.profile_variants.split(",")
                if args.profile]

    headline, production = engines[0], "full/fast"
    by_size = {r["sites"]: r for r in results.get(headline, [])}
    at50 = by_size[50][production]["overhead_s"] if 50 in by_size and production in by_size[50] \
        else None
    loop = results.get("loopback", [])

    def per_size(rows, variant, key):
        return {str(r["sites"]): round(r[variant][key], 3) for r in rows if variant in r}

    out = {
        "overhead_s_at_50": None if at50 is None else round(at50, 3),
        "target_overhead_s": TARGET_S,
        "meets_target": None if at50 is None else at50 <= TARGET_S,
        "method": headline,
        "variant": production,
        "overhead_s_at_50_by_variant": {
            v: round(x["overhead_s"], 3) for v, x in by_size.get(50, {}).items()
            if isinstance(x, dict)
        },
        "parallel_est_overhead_s_at_50_by_variant": {
            v: round(x["parallel_est_overhead_s"], 3) for v, x in by_size.get(50, {}).items()
            if isinstance(x, dict) and x.get("parallel_est_overhead_s") is not None
        },
        "vector_len": vector_len,
        "candidates": args.candidates,
        "bins": args.bins,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "overhead_s": {
            engine: {v: per_size(rs, v, "overhead_s") for v in ran[engine]}
            for engine, rs in results.items()
        },
        "parallel_est_overhead_s": {v: per_size(loop, v, "parallel_est_overhead_s")
                                    for v in ran.get("loopback", [])},
        "coordinator_overhead_s": {v: per_size(loop, v, "coordinator_s")
                                   for v in ran.get("loopback", [])},
        "shares_threshold": {
            g: {str(n): [graph_settings(g, n, 60).shares_for(n),
                         graph_settings(g, n, 60).threshold_for(n, MIN_SITES)] for n in sizes}
            for g in sorted({parse_variant(v)[0] for v in variants})
        },
        "fhauc_anchor": {
            "anchor_s": FHAUC_S, "anchor_parties": FHAUC_PARTIES,
            "ratio_at_50": None if at50 is None else round(at50 / FHAUC_S, 1),
        },
        "rows": _rounded(results),
        "profile": profiles or None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

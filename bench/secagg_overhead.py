"""Seconds per round: SecAgg+ (with fedmerge's masks) against a plain sum, in simulation.

Both paths run in ONE Flower simulation (same Ray actors, same sites, same vectors), so the
difference is the protocol alone: four SecAgg+ stages, key agreement, mask expansion and
unmasking against one plain request/reply whose vectors the server adds in the clear. The
vector sizes are those the search sends: candidates × 2 classes × bins (an 11-point grid round
and a 3-candidate round at 2048 bins). Last line: one JSON object.
Target: overhead_s <= 1.0 for the largest vector.
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

import numpy as np  # noqa: E402

PLAIN_KEY = "bench.vector"


def _vector(node_id: int, rnd: int, length: int) -> np.ndarray:
    rng = np.random.default_rng([node_id & 0xFFFFFFFF, rnd])
    return rng.integers(0, 50, length).astype(np.int64)


def make_client_app():
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from client.secagg_guard import GuardPolicy, checked_secaggplus_mod

    # The site's SecAgg+ guard (Flower's mod behind the site's rules, fedmerge's masks).
    guard = checked_secaggplus_mod(
        lambda context: GuardPolicy(site=f"site-{context.node_id}", min_sites=3)
    )
    app = ClientApp(mods=[guard])

    @app.train()
    def train(msg, context):
        from client.client_app import histogram_reply, read_instructions

        instr = read_instructions(msg)
        bins = instr.histogram.bins
        vec = _vector(msg.metadata.dst_node_id, instr.round, len(instr.candidates) * 2 * bins)
        hists = [
            (vec[i : i + bins], vec[i + bins : i + 2 * bins]) for i in range(0, len(vec), 2 * bins)
        ]
        return histogram_reply(msg, hists, bins)

    @app.query()
    def query(msg, context):
        from flwr.app import Array

        cfg = msg.content.config_records["bench"]
        vec = _vector(msg.metadata.dst_node_id, int(cfg["round"]), int(cfg["length"]))
        return Message(
            RecordDict({PLAIN_KEY: ArrayRecord({"v": Array(vec.astype(np.float64))})}), reply_to=msg
        )

    return app


def make_server_app(lengths, rounds, sites, results):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.serverapp import ServerApp

    from common.metrics import HistogramSpec
    from common.protocol import RoundInstructions
    from server.grid import CoordinatorGrid
    from server.recipe import SecAggSettings
    from server.secagg import secure_round

    app = ServerApp()

    @app.main()
    def main(grid, context):
        grid = CoordinatorGrid(grid)
        while len(list(grid.get_node_ids())) < sites:
            time.sleep(0.2)
        nodes = sorted(grid.get_node_ids())
        rnd = 0
        for length in lengths:
            bins = 2048
            cands = length // (2 * bins)
            plain_t, secure_t = [], []
            for i in range(rounds + 1):  # round 0 warms both paths up
                rnd += 1
                t0 = time.perf_counter()
                content = RecordDict({"bench": ConfigRecord({"round": rnd, "length": length})})
                msgs = [
                    Message(content=content, dst_node_id=n, message_type=MessageType.QUERY)
                    for n in nodes
                ]
                replies = list(grid.send_and_receive(msgs, timeout=120))
                total = sum(r.content.array_records[PLAIN_KEY]["v"].numpy() for r in replies)
                assert len(replies) == sites and total.shape == (length,)
                t1 = time.perf_counter()
                rnd += 1
                instr = RoundInstructions(
                    round=rnd,
                    stage="tune",
                    recipe_fingerprint="bench",
                    parent_fingerprints=("a", "b"),
                    method="linear",
                    candidates=[0.5] * cands,
                    fold=0,
                    folds=2,
                    histogram=HistogramSpec(bins=bins),
                    sites=sites,
                )
                out = secure_round(
                    grid,
                    context,
                    node_ids=nodes,
                    instructions=instr,
                    settings=SecAggSettings(timeout=120),
                )
                assert len(out.contributors) == sites
                t2 = time.perf_counter()
                if i > 0:
                    plain_t.append(t1 - t0)
                    secure_t.append(t2 - t1)
            results.append(
                {
                    "vector_len": length,
                    "plain_round_s": float(np.median(plain_t)),
                    "secagg_round_s": float(np.median(secure_t)),
                }
            )

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lengths", default="45056,12288", help="Comma-separated vector lengths.")
    args = ap.parse_args()
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    lengths = [int(x) for x in args.lengths.split(",")]
    results: list[dict] = []
    t0 = time.perf_counter()
    run_simulation(
        server_app=make_server_app(lengths, args.rounds, args.sites, results),
        client_app=make_client_app(),
        num_supernodes=args.sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"log_to_driver": False},
        },
    )
    for r in results:
        r["overhead_s"] = r["secagg_round_s"] - r["plain_round_s"]
        print(
            f"vector {r['vector_len']:>7}: secagg {r['secagg_round_s']:.3f} s/round, plain "
            f"{r['plain_round_s']:.3f} s/round, overhead {r['overhead_s']:.3f} s"
        )
    print(
        f"(whole run {time.perf_counter() - t0:.1f} s incl. Ray start; {args.sites} sites, "
        f"median of {args.rounds} rounds)"
    )
    worst = max(results, key=lambda r: r["vector_len"])
    print(
        json.dumps(
            {
                **worst,
                "sites": args.sites,
                "rounds": args.rounds,
                "all": results,
                "target_overhead_s": 1.0,
            }
        )
    )


if __name__ == "__main__":
    main()

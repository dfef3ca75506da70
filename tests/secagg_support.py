"""Test support for SecAgg+ rounds in one process (simulation.loopback_grid): fixed sites."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.clientapp import ClientApp

from client.client_app import histogram_reply, read_instructions
from client.secagg_guard import GuardPolicy, checked_secaggplus_mod
from common.metrics import HistogramSpec
from common.protocol import RoundInstructions
from simulation.loopback_grid import LoopbackGrid  # noqa: F401 (re-exported for the tests)

BINS = 16
SITE_GUARD = checked_secaggplus_mod(lambda context: GuardPolicy(site="site", min_sites=3))


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """Messages take their run and sender from TaskIdentity, as run_simulation sets it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    yield


def fixed_instructions(candidates: int, rnd: int = 1) -> RoundInstructions:
    return RoundInstructions(
        round=rnd,
        stage="tune",
        recipe_fingerprint="r",
        parent_fingerprints=("a", "b"),
        method="linear",
        candidates=[i / max(candidates - 1, 1) for i in range(candidates)],
        fold=0,
        folds=2,
        histogram=HistogramSpec(bins=BINS, lo=-4, hi=4),
        sites=3,
    )


def fixed_site_app(hists, fail: bool = False, mod=SITE_GUARD) -> ClientApp:
    """A ClientApp whose train handler returns fixed histograms the real way, behind the
    site's SecAgg+ guard (as fedmerge's ClientApp registers it)."""
    app = ClientApp()

    @app.train(mods=[mod])
    def train(msg, context):
        assert read_instructions(msg).round >= 1
        if fail:
            raise RuntimeError("site dropped")
        return histogram_reply(msg, hists, BINS)

    return app


def random_hists(rng, candidates: int, high: int):
    return [
        (rng.integers(0, high, BINS, dtype=np.int64), rng.integers(0, high, BINS, dtype=np.int64))
        for _ in range(candidates)
    ]

"""SecAgg+ round trips in one process: exact integer sums, dropouts, and the halt.

The transport here is a loopback Grid that hands each message straight to a real ClientApp
(with fedmerge's SecAgg+ mod) and returns its reply; the Flower workflow, the client mod, the
masks and the encoding are the real ones. The Ray-based simulation test covers the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from secagg_support import (  # noqa: F401 (task_identity: autouse fixture)
    BINS,
    LoopbackGrid,
    fixed_instructions,
    fixed_site_app,
    random_hists,
    task_identity,
)

from common.errors import FedmergeError
from common.secure_sum import (
    ExactSumSettings,
    decode_sum,
    encode_histograms,
)
from server.grid import CoordinatorGrid
from server.recipe import SecAggSettings
from server.secagg import secure_round


def _ctx():
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _run(site_hists, failing=(), settings=SecAggSettings(timeout=5.0), candidates=3):
    apps = {100 + i: fixed_site_app(h, fail=i in failing) for i, h in enumerate(site_hists)}
    grid = CoordinatorGrid(LoopbackGrid(apps))
    out = secure_round(
        grid, _ctx(), node_ids=list(apps), instructions=fixed_instructions(candidates),
        settings=settings,
    )
    return out, grid, list(apps)


def test_sum_is_exact_up_to_the_clipping_range():
    rng = np.random.default_rng(0)
    sites = [random_hists(rng, 3, 1000) for _ in range(4)]
    sites[0][0][0][3] = ExactSumSettings().max_count  # the largest count that is not clipped
    out, grid, nodes = _run(sites)
    assert sorted(out.contributors) == nodes and not out.failures
    for c in range(3):
        for k in range(2):
            expect = sum(s[c][k] for s in sites)
            np.testing.assert_array_equal(out.histograms[c][k], expect)
    # Only masked vectors came back: none equals a site's plaintext encoding.
    plain = [encode_histograms(s, BINS) for s in sites]
    from flwr.common import bytes_to_ndarray

    masked = [
        bytes_to_ndarray(b)
        for m in grid.received
        if not m.has_error() and RECORD_KEY_CONFIGS in m.content.config_records
        for b in m.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
    ]
    assert len(masked) == 2 * len(sites)  # factor + vector per site
    for arr in masked:
        for p in plain:
            assert arr.shape != p.shape or not np.array_equal(arr, p)


def test_dropped_site_sum_of_survivors():
    rng = np.random.default_rng(1)
    sites = [random_hists(rng, 2, 50) for _ in range(5)]
    out, _, nodes = _run(sites, failing={1, 3}, candidates=2)
    assert out.contributors == [nodes[0], nodes[2], nodes[4]]
    assert set(out.failures) == {nodes[1], nodes[3]}
    for c in range(2):
        for k in range(2):
            np.testing.assert_array_equal(
                out.histograms[c][k], sites[0][c][k] + sites[2][c][k] + sites[4][c][k]
            )


def test_below_threshold_fails_with_a_clear_message():
    rng = np.random.default_rng(2)
    sites = [random_hists(rng, 1, 9) for _ in range(5)]
    with pytest.raises(
        FedmergeError, match=r"secure aggregation halted.*threshold 3.*site:handler-failed"
    ) as stopped:
        _run(sites, failing={0, 1, 2}, candidates=1)
    # The stop carries its cause code and the failing nodes, which the report names as sites.
    assert stopped.value.cause == "too-few-sites"
    assert sorted(stopped.value.nodes) == [100, 101, 102]


def test_upstream_masks_on_one_side_break_the_sum():
    """If only one end used the replacement generator, the masks would not cancel: the exact
    sum above is therefore evidence that both ends use it."""
    import importlib

    from common import secure_masks

    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    rng = np.random.default_rng(3)
    sites = [random_hists(rng, 1, 9) for _ in range(3)]
    secure_masks.install()
    original = mod.pseudo_rand_gen

    def weak_mod(msg, ctx, call_next):
        from flwr.client.mod import secaggplus_mod

        mod.pseudo_rand_gen = secure_masks.UPSTREAM["pseudo_rand_gen"]
        try:
            return secaggplus_mod(msg, ctx, call_next)
        finally:
            mod.pseudo_rand_gen = original

    apps = {100 + i: fixed_site_app(h, mod=weak_mod) for i, h in enumerate(sites)}
    grid = CoordinatorGrid(LoopbackGrid(apps))
    with pytest.raises(FedmergeError, match="not an exact non-negative integer sum"):
        secure_round(
            grid,
            _ctx(),
            node_ids=list(apps),
            instructions=fixed_instructions(1),
            settings=SecAggSettings(timeout=5.0),
        )


def test_encoder_refuses_what_flower_would_clip():
    big = ExactSumSettings().max_count + 1
    with pytest.raises(FedmergeError, match="would clip silently"):
        encode_histograms([(np.full(BINS, big), np.zeros(BINS, np.int64))], BINS)
    with pytest.raises(FedmergeError, match="expected integer counts"):
        encode_histograms([(np.zeros(BINS), np.zeros(BINS))], BINS)
    with pytest.raises(FedmergeError, match=r"expected \(16,\)"):
        encode_histograms([(np.zeros(3, np.int64), np.zeros(BINS, np.int64))], BINS)
    with pytest.raises(FedmergeError, match="not an exact"):
        decode_sum(np.full(2 * BINS, 0.4), 3, 1, BINS)
    # A noisy sum may be negative, but no count of three sites lies past 3 x max_count.
    most = ExactSumSettings().max_count
    edge = np.full(2 * BINS, -float(most))  # the mean over 3 sites: a sum of -3 x max_count
    assert decode_sum(edge, 3, 1, BINS, noisy=True, max_count=most)[0][0][0] == -3 * most
    with pytest.raises(FedmergeError, match="the masks did not cancel"):
        decode_sum(edge - 1, 3, 1, BINS, noisy=True, max_count=most)


def test_exact_settings_are_checked():
    with pytest.raises(ValueError, match="expected an integer"):
        ExactSumSettings(clipping_range=3.0, quantization_range=2**21)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        ExactSumSettings(clipping_range=2.0**30, quantization_range=2**31)
    assert ExactSumSettings().max_sites == 2047
    with pytest.raises(FedmergeError, match="would wrap"):
        ExactSumSettings().check_sites(3000)

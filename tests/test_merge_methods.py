"""Each merge method, written by the real writer, equals its formula in float64 numpy to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_support import (
    assert_close,
    layer_index,
    load_np,
    load_written,
    ref_combine,
    ref_cos,
    ref_dare_delta,
    ref_linear,
    ref_slerp,
    ref_topk,
    rewrite,
)

from common.merge.config import MergeConfig
from common.merge.methods.dare import dare_keep_mask
from common.merge.writer import write_merge


@pytest.fixture(scope="session")
def trio(tiny_parents, tiny_tokenizer, tmp_path_factory):
    """Parents A and B plus a base model C of the same architecture (task-arithmetic family)."""
    from common.tiny_models import build_tiny_llama

    c = build_tiny_llama(tmp_path_factory.mktemp("base") / "base_c", tiny_tokenizer, seed=3)
    return (*tiny_parents, c)


@pytest.fixture(scope="session")
def deep_pair(tiny_tokenizer, tmp_path_factory):
    """Three-layer parents, so a layer gradient has an interior layer (x = 0.5)."""
    from common.tiny_models import build_tiny_llama

    root = tmp_path_factory.mktemp("deep")
    return tuple(build_tiny_llama(root / f"d{s}", tiny_tokenizer, seed=s, num_hidden_layers=3)
                 for s in (11, 12))


def merge(tmp_path, recipe: dict, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    write_merge(MergeConfig.from_dict(recipe), out, **kw)
    return load_written(out)


def test_linear_three_models_unnormalized_and_normalized(trio, tmp_path):
    a, b, c = trio
    A, B, C = load_np(a), load_np(b), load_np(c)
    ws = [0.5, 0.3, 0.7]
    models = [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(trio, ws,
                                                                                strict=True)]
    got = merge(tmp_path, {"models": models, "merge_method": "linear"})
    assert_close(got, {k: ref_linear([A[k], B[k], C[k]], ws) for k in A})
    got = merge(tmp_path / "raw", {"models": models, "merge_method": "linear",
                                   "parameters": {"normalize": False}})
    assert_close(got, {k: ref_linear([A[k], B[k], C[k]], ws, normalize=False) for k in A})


def test_slerp_scalar_t(tiny_parents, tmp_path):
    a, b = tiny_parents
    A, B = load_np(a), load_np(b)
    recipe = {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "slerp",
              "base_model": str(a), "parameters": {"t": 0.3}}
    got = merge(tmp_path, recipe)
    want = {k: ref_slerp(A[k], B[k], 0.3) for k in A}
    assert_close(got, want)
    # Random weight matrices are far from parallel: SLERP must differ from plain lerp there.
    k = "model.layers.0.self_attn.q_proj.weight"
    assert np.max(np.abs(want[k] - (0.7 * A[k] + 0.3 * B[k]))) > 1e-3


def test_slerp_base_model_is_t0(tiny_parents, tmp_path):
    """t refers to the non-base model: with base B, t = 0.3 is slerp(B, A, 0.3)."""
    a, b = tiny_parents
    A, B = load_np(a), load_np(b)
    recipe = {"models": [{"model": str(a)}, {"model": str(b)}], "merge_method": "slerp",
              "base_model": str(b), "parameters": {"t": 0.3}}
    assert_close(merge(tmp_path, recipe), {k: ref_slerp(B[k], A[k], 0.3) for k in A})


def test_slerp_near_parallel_and_opposite_fall_back_to_linear(tiny_parents, tmp_path):
    a, _ = tiny_parents
    near, opp = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"
    g = torch.Generator().manual_seed(0)

    def make_p(ts):
        ts[near] = torch.randn(ts[near].shape, generator=g)
        return ts

    p = rewrite(a, tmp_path / "p", make_p)
    P = load_np(p)

    def make_q(ts):
        ts[near] = (torch.from_numpy(P[near]).float()
                    + 0.015 * torch.randn(ts[near].shape, generator=g))
        ts[opp] = -ts[opp]
        return ts

    q = rewrite(p, tmp_path / "q", make_q)
    Q = load_np(q)
    assert 0.9995 < ref_cos(P[near], Q[near]) < 0.99995
    assert ref_cos(P[opp], Q[opp]) < -0.9995
    recipe = {"models": [{"model": str(p)}, {"model": str(q)}], "merge_method": "slerp",
              "base_model": str(p), "parameters": {"t": 0.3}}
    got = merge(tmp_path, recipe)
    assert_close(got, {k: ref_slerp(P[k], Q[k], 0.3) for k in P})
    for k in (near, opp):
        np.testing.assert_allclose(got[k], 0.7 * P[k] + 0.3 * Q[k], atol=1e-6)
    # The fallback matters: the spherical formula would be measurably different (near) or
    # undefined (opposite, θ = π).
    theta = np.arccos(ref_cos(P[near], Q[near]))
    spherical = (np.sin(0.7 * theta) * P[near] + np.sin(0.3 * theta) * Q[near]) / np.sin(theta)
    assert np.max(np.abs(spherical - got[near])) > 1e-5


def test_slerp_layer_gradient(deep_pair, tmp_path):
    a, b = deep_pair
    A, B = load_np(a), load_np(b)
    grad = [0.0, 0.2, 0.6, 1.0]
    recipe = {"models": [str(a), str(b)], "merge_method": "slerp", "base_model": str(a),
              "parameters": {"t": grad}}
    got = merge(tmp_path, recipe)
    # 3 layers: layer i sits at x = i/2, i.e. list position 1.5·i -> t = 0, 0.4, 1.0;
    # tensors outside the layers take the first value.
    t_of = {None: 0.0, 0: 0.0, 1: 0.4, 2: 1.0}
    assert_close(got, {k: ref_slerp(A[k], B[k], t_of[layer_index(k)]) for k in A})
    k = "model.layers.{}.mlp.down_proj.weight"
    np.testing.assert_array_equal(got[k.format(0)], A[k.format(0)])
    np.testing.assert_allclose(got[k.format(2)], B[k.format(2)], atol=1e-7)


def test_name_filters_with_gradient_and_fallback(deep_pair, tmp_path):
    a, b = deep_pair
    A, B = load_np(a), load_np(b)
    t = [{"filter": "self_attn", "value": 0.2},
         {"filter": "mlp", "value": [0.1, 0.9]},
         {"value": 0.5}]
    recipe = {"models": [str(a), str(b)], "merge_method": "slerp", "base_model": str(a),
              "parameters": {"t": t}}
    got = merge(tmp_path, recipe)

    def t_for(name):
        if "self_attn" in name:
            return 0.2
        if "mlp" in name:
            return 0.1 + 0.8 * layer_index(name) / 2
        return 0.5

    assert_close(got, {k: ref_slerp(A[k], B[k], t_for(k)) for k in A})


def test_linear_per_model_filters_override_global(trio, tmp_path):
    a, b, _ = trio
    A, B = load_np(a), load_np(b)
    recipe = {
        "models": [
            {"model": str(a), "parameters": {"weight": [{"filter": "mlp", "value": 0.9},
                                                        {"filter": "embed", "value": 0.25}]}},
            {"model": str(b)},
        ],
        "merge_method": "linear",
        "parameters": {"weight": 0.5},
    }
    got = merge(tmp_path, recipe)

    def w_a(name):
        return 0.9 if "mlp" in name else 0.25 if "embed" in name else 0.5

    assert_close(got, {k: ref_linear([A[k], B[k]], [w_a(k), 0.5]) for k in A})


def test_task_arithmetic(trio, tmp_path):
    a, b, c = trio
    A, B, C = load_np(a), load_np(b), load_np(c)
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.6}},
                         {"model": str(b), "parameters": {"weight": 0.3}},
                         {"model": str(c)}],
              "merge_method": "task_arithmetic", "base_model": str(c),
              "parameters": {"lambda": 0.8}}
    got = merge(tmp_path, recipe)
    want = {k: C[k] + 0.8 * (0.6 * (A[k] - C[k]) + 0.3 * (B[k] - C[k])) for k in A}
    assert_close(got, want)


def test_ties(trio, tmp_path):
    a, b, c = trio
    A, B, C = load_np(a), load_np(b), load_np(c)
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5, "density": 0.3}}],
              "merge_method": "ties", "base_model": str(c), "parameters": {"lambda": 0.9}}
    got = merge(tmp_path, recipe)
    want = {
        k: ref_combine(C[k], [ref_topk(A[k] - C[k], 0.5), ref_topk(B[k] - C[k], 0.3)],
                       [0.7, 0.5], consensus=True, normalize=True, lam=0.9)
        for k in A
    }
    assert_close(got, want)
    k = "model.layers.0.mlp.gate_proj.weight"
    plain = C[k] + 0.9 * (0.7 * (A[k] - C[k]) + 0.5 * (B[k] - C[k])) / 1.2
    assert np.max(np.abs(want[k] - plain)) > 1e-3  # sparsification and election did something


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_seeded(trio, tmp_path, method):
    a, b, c = trio
    A, B, C = load_np(a), load_np(b), load_np(c)
    dens = [0.6, 0.4]
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.7, "density": dens[0]}},
                         {"model": str(b), "parameters": {"weight": 0.5, "density": dens[1]}}],
              "merge_method": method, "base_model": str(c)}
    got = merge(tmp_path / "s7", recipe, seed=7)
    want, kept, total = {}, 0, 0
    for k in A:
        deltas = []
        for i, (x, d) in enumerate(zip((A[k], B[k]), dens, strict=True)):
            keep = dare_keep_mask(7, i, k, x.shape, d).numpy()
            if i == 0:
                kept, total = kept + int(keep.sum()), total + keep.size
            deltas.append(ref_dare_delta(x - C[k], keep, rescale=True))
        want[k] = ref_combine(C[k], deltas, [0.7, 0.5], consensus=method == "dare_ties",
                              normalize=method == "dare_ties", lam=1.0)
    assert_close(got, want)
    assert abs(kept / total - 0.6) < 0.01  # the masks really are Bernoulli(density)
    again = merge(tmp_path / "s7b", recipe, seed=7)
    other = merge(tmp_path / "s8", recipe, seed=8)
    k = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(again[k], got[k])
    assert np.max(np.abs(other[k] - got[k])) > 1e-4


def test_dare_without_rescale_and_full_density_is_task_arithmetic(trio, tmp_path):
    a, b, c = trio
    A, C = load_np(a), load_np(c)
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}}],
              "merge_method": "dare_linear", "base_model": str(c),
              "parameters": {"rescale": False}}
    got = merge(tmp_path / "norescale", recipe, seed=1)
    k = "model.norm.weight"
    keep = dare_keep_mask(1, 0, k, A[k].shape, 0.5).numpy()
    np.testing.assert_allclose(got[k], C[k] + np.where(keep, A[k] - C[k], 0.0), atol=1e-6)
    recipe["models"][0]["parameters"]["density"] = 1.0
    got = merge(tmp_path / "full", recipe, seed=1)
    assert_close(got, {k: A[k] for k in A})


def test_output_dtype_bfloat16(tiny_parents, tmp_path):
    a, b = tiny_parents
    A, B = load_np(a), load_np(b)
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 1.0}},
                         {"model": str(b), "parameters": {"weight": 1.0}}],
              "merge_method": "linear", "dtype": "bfloat16"}
    out = tmp_path / "bf16"
    write_merge(MergeConfig.from_dict(recipe), out)
    from safetensors.torch import load_file

    got = load_file(str(out / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert got[k].dtype == torch.bfloat16
    want = torch.from_numpy((A[k] + B[k]) / 2).float()
    # within one bfloat16 rounding of the exact value
    torch.testing.assert_close(got[k].float(), want, rtol=2**-8, atol=1e-6)
    assert not torch.equal(got[k].float(), want)  # really rounded to bf16

"""The in-place λ switch writes exactly what `fedmerge merge` of the two-parent recipe writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_support import load_np, load_written, ref_linear, ref_slerp

from common.errors import FedmergeError
from common.merge.config import MergeConfig
from common.merge.switch import InPlaceMerger
from common.merge.writer import write_merge

GROUP_LAM = {"attention": 0.2, "mlp": 0.7, "other": 0.45}


@pytest.fixture(scope="module")
def slerp_switch(tiny_parents):
    return InPlaceMerger(*tiny_parents, method="slerp")


@pytest.fixture(scope="module")
def linear_switch(tiny_parents):
    return InPlaceMerger(*tiny_parents, method="linear")


def live(merger) -> dict[str, np.ndarray]:
    sd = merger.model.state_dict()
    return {k: sd[k].detach().cpu().double().numpy() for k in merger.tensor_names}


def group_of(name):
    return "attention" if "self_attn" in name else "mlp" if "mlp" in name else "other"


@pytest.mark.parametrize("method", ["slerp", "linear"])
@pytest.mark.parametrize("lam", [0.35, GROUP_LAM], ids=["scalar", "groups"])
def test_switch_equals_written_merge(tiny_parents, tmp_path, method, lam, request):
    merger = request.getfixturevalue(f"{method}_switch")
    merger.apply(lam)
    out = tmp_path / "out"
    write_merge(MergeConfig.two_parent(*tiny_parents, method, lam), out)
    written = load_written(out)
    got = live(merger)
    assert set(written) == set(got)
    for k in written:
        np.testing.assert_allclose(got[k], written[k], atol=1e-6, rtol=0, err_msg=k)
    # and both equal the formula
    A, B = load_np(tiny_parents[0]), load_np(tiny_parents[1])
    for k in A:
        t = lam if isinstance(lam, float) else lam[group_of(k)]
        want = ref_slerp(A[k], B[k], t) if method == "slerp" else ref_linear([A[k], B[k]],
                                                                              [1 - t, t])
        np.testing.assert_allclose(got[k], want, atol=1e-6, rtol=0, err_msg=k)


def test_unnamed_groups_take_the_mean_of_the_named(slerp_switch, tiny_parents):
    A, B = load_np(tiny_parents[0]), load_np(tiny_parents[1])
    slerp_switch.apply({"attention": 0.2, "mlp": 0.8})
    got = live(slerp_switch)
    for k in A:
        t = {"attention": 0.2, "mlp": 0.8, "other": 0.5}[group_of(k)]
        np.testing.assert_allclose(got[k], ref_slerp(A[k], B[k], t), atol=1e-6, rtol=0)
    with pytest.raises(FedmergeError, match="groups among attention, mlp, other, got heads"):
        slerp_switch.apply({"heads": 0.5})


def test_endpoints_are_the_parents_and_forward_follows(slerp_switch, tiny_parents):
    A, B = load_np(tiny_parents[0]), load_np(tiny_parents[1])
    ids = torch.tensor([[2, 5, 9, 14, 20]])

    def logits():
        with torch.no_grad():
            return slerp_switch.model(input_ids=ids).logits.clone()

    slerp_switch.apply(0.0)
    got = live(slerp_switch)
    for k in A:
        np.testing.assert_array_equal(got[k], A[k])
    at_a = logits()
    slerp_switch.apply(1.0)
    got = live(slerp_switch)
    for k in B:
        np.testing.assert_array_equal(got[k], B[k])
    assert not torch.allclose(logits(), at_a)
    slerp_switch.apply(0.0)
    torch.testing.assert_close(logits(), at_a, rtol=0, atol=0)


def test_bad_lambda_is_refused(slerp_switch, linear_switch):
    with pytest.raises(FedmergeError, match=r"\[0, 1\], got 1.5"):
        slerp_switch.apply(1.5)
    with pytest.raises(FedmergeError, match="attention, mlp, other, got none"):
        slerp_switch.apply({})
    with pytest.raises(FedmergeError, match=r"lambda\[mlp\]"):
        slerp_switch.apply({"attention": 0.1, "mlp": 1.2})
    with pytest.raises(FedmergeError, match="finite"):
        linear_switch.apply(float("nan"))


def test_switch_refuses_mismatched_parents(tiny_parents, tiny_tokenizer, tmp_path):
    from common.tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "wide", tiny_tokenizer, seed=4, intermediate_size=96)
    with pytest.raises(FedmergeError, match="intermediate_size"):
        InPlaceMerger(tiny_parents[0], other)
    with pytest.raises(FedmergeError, match="expected slerp or linear"):
        InPlaceMerger(*tiny_parents, method="ties")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_switch_on_cuda_matches_cpu(tiny_parents, slerp_switch):
    gpu = InPlaceMerger(*tiny_parents, method="slerp", device="cuda", dtype=torch.float32)
    gpu.apply(GROUP_LAM)
    slerp_switch.apply(GROUP_LAM)
    cpu_sd, gpu_sd = slerp_switch.model.state_dict(), gpu.model.state_dict()
    for k in slerp_switch.tensor_names:
        torch.testing.assert_close(gpu_sd[k].cpu(), cpu_sd[k], atol=1e-6, rtol=0)

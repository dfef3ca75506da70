"""The in-place λ switch writes exactly what `fedmerge merge` of the two-parent recipe writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from merge_support import (
    POISONED,
    load_np,
    load_np_torch,
    load_written,
    poisoned,
    ref_linear,
    ref_slerp,
    write_sharded,
)

from common.errors import FedmergeError
from common.merge.config import MergeConfig
from common.merge.methods.linear import weighted_sum
from common.merge.stream import (
    CPU_CHUNK,
    MIN_DEVICE_MARGIN,
    WorkBuffers,
    choose_placement,
    mix_tensor,
)
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


@pytest.fixture(scope="module")
def bf16_parents(tiny_parents, tmp_path_factory):
    """The tiny pair stored as released LLMs are: bf16, each spread over three shards."""
    root = tmp_path_factory.mktemp("bf16")
    return tuple(write_sharded(p, root / p.name, torch.bfloat16, shards=3) for p in tiny_parents)


def reference(parents, method, lam) -> dict[str, np.ndarray]:
    A, B = load_np_torch(parents[0]), load_np_torch(parents[1])
    out = {}
    for k in A:
        t = lam if isinstance(lam, float) else lam[group_of(k)]
        out[k] = ref_slerp(A[k], B[k], t) if method == "slerp" else ref_linear(
            [A[k], B[k]], [1 - t, t])
    return out


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_bf16_sharded_parents_stay_bf16_and_merge_as_written(bf16_parents, tmp_path, method):
    assert len(list(bf16_parents[1].glob("*.safetensors"))) == 3
    merger = InPlaceMerger(*bf16_parents, method=method)
    # parents are the mapped bf16 files; only two chunk buffers are added
    assert {s.a.dtype for s in merger._slots} == {s.b.dtype for s in merger._slots} == {
        torch.bfloat16}
    mem = merger.memory
    assert mem["placement"] == "mapped"
    assert 0 < mem["work_bytes"] <= torch.get_num_threads() * 2 * CPU_CHUNK * 4
    assert mem["parent_bytes"] == mem["live_bytes"]  # two bf16 parents = one fp32 model
    for lam in (0.35, GROUP_LAM):
        merger.apply(lam)
        got = live(merger)
        want = reference(bf16_parents, method, lam)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
    # and the float32 merge `fedmerge merge` writes of the same recipe (still GROUP_LAM)
    out = tmp_path / "out"
    write_merge(MergeConfig.two_parent(*bf16_parents, method, GROUP_LAM).model_copy(
        update={"dtype": "float32"}), out)
    written = load_written(out)
    for k in written:
        np.testing.assert_allclose(got[k], written[k], atol=1e-6, rtol=0, err_msg=k)


def test_bf16_live_model_is_the_written_bf16_merge(bf16_parents, tmp_path):
    """A bf16 live model computes in float32 and rounds once, as the writer does."""
    merger = InPlaceMerger(*bf16_parents, method="slerp", dtype=torch.bfloat16)
    merger.apply(GROUP_LAM)
    out = tmp_path / "out"
    write_merge(MergeConfig.two_parent(*bf16_parents, "slerp", GROUP_LAM), out)
    written = load_np_torch(out)
    got = live(merger)
    assert merger.model.model.embed_tokens.weight.dtype == torch.bfloat16
    for k in written:
        np.testing.assert_array_equal(got[k], written[k], err_msg=k)


@pytest.mark.parametrize("live_dtype", [torch.float32, torch.bfloat16])
def test_chunked_mix_equals_the_whole_tensor_kernel(live_dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10_007, generator=gen).to(torch.bfloat16)
    b = torch.randn(10_007, generator=gen)  # mixed storage dtypes
    want = weighted_sum([a.float(), b], [0.3, -1.7]).to(live_dtype)
    out = torch.empty(10_007, dtype=live_dtype)
    mix_tensor(out, a, b, 0.3, -1.7, WorkBuffers.allocate(1024, torch.float32, "cpu"), 1024)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_placement_keeps_parents_on_the_gpu_only_with_room():
    gib = 1 << 30
    assert choose_placement("auto", "cpu", 30 * gib, None, None)[0] == "mapped"
    assert choose_placement("auto", "cuda", 30 * gib, 40 * gib, 80 * gib)[0] == "device"
    # margin = max(2 GiB, 10 % of the device): 8 GiB on an 80 GiB device
    assert choose_placement("auto", "cuda", 30 * gib, 37 * gib, 80 * gib)[0] == "streamed"
    assert choose_placement("auto", "cuda", 10 * gib, 10 * gib + MIN_DEVICE_MARGIN,
                            16 * gib)[0] == "device"
    assert choose_placement("auto", "cuda", 10 * gib, 10 * gib + MIN_DEVICE_MARGIN - 1,
                            16 * gib)[0] == "streamed"
    assert choose_placement("host", "cuda", gib, 80 * gib, 80 * gib)[0] == "streamed"
    assert choose_placement("device", "cuda", 90 * gib, 80 * gib, 80 * gib)[0] == "device"
    with pytest.raises(FedmergeError, match="auto, device or host, got 'gpu'"):
        InPlaceMerger("a", "b", parents="gpu")


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_switch_refuses_non_finite_parent(bf16_parents, tmp_path, value, kind):
    bad = poisoned(bf16_parents[1], tmp_path / "poisoned", value)
    with pytest.raises(FedmergeError, match=f"tensor {POISONED} contains {kind}"):
        InPlaceMerger(bf16_parents[0], bad, method="linear")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("parents", ["device", "host"])
def test_cuda_placements_match_cpu(bf16_parents, parents):
    cpu = InPlaceMerger(*bf16_parents, method="slerp")
    gpu = InPlaceMerger(*bf16_parents, method="slerp", device="cuda", dtype=torch.float32,
                        parents=parents)
    assert gpu.placement == {"device": "device", "host": "streamed"}[parents]
    for lam in (0.35, GROUP_LAM):
        cpu.apply(lam)
        gpu.apply(lam)
        cpu_sd, gpu_sd = cpu.model.state_dict(), gpu.model.state_dict()
        for k in cpu.tensor_names:
            torch.testing.assert_close(gpu_sd[k].cpu(), cpu_sd[k], atol=1e-6, rtol=0)


def test_conversion_split_into_many_chunks_and_threads(bf16_parents, monkeypatch):
    """Chunks that cut tensors mid-row, dealt to several threads, still give the formula."""
    from common.merge import stream

    monkeypatch.setattr(stream, "CPU_CHUNK", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    merger = InPlaceMerger(*bf16_parents, method="slerp")
    plans = merger._cpu.plans
    assert len(plans) == 3
    shares = [sum(j - i for _, i, j in p) for p in plans]
    assert sum(shares) == sum(s.target.numel() for s in merger._slots)
    assert max(shares) - min(shares) <= 2  # the elements, not the tensors, are split evenly
    merger.apply(GROUP_LAM)
    got, want = live(merger), reference(bf16_parents, "slerp", GROUP_LAM)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
    merger.close()

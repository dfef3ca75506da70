"""Every refused input gives one clear FedmergeError before any work, and leaves nothing behind."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from merge_support import POISONED, load_np, load_written, poisoned, ref_linear, rewrite

from common.errors import FedmergeError
from common.merge.config import MergeConfig
from common.merge.writer import write_merge

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def linear(*paths, weights=None, **extra) -> dict:
    weights = weights or [1.0] * len(paths)
    return {"models": [{"model": str(p), "parameters": {"weight": w}}
                       for p, w in zip(paths, weights, strict=True)],
            "merge_method": "linear", **extra}


def refused(tmp_path, recipe, match: str) -> FedmergeError:
    """Run the merge expecting `match`; check the message is one line and nothing was left."""
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    with pytest.raises(FedmergeError, match=match) as exc:
        config = recipe if isinstance(recipe, MergeConfig) else MergeConfig.from_dict(recipe)
        write_merge(config, out)
    assert "\n" not in str(exc.value)
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # no temporary directory either
    return exc.value


@pytest.fixture(scope="module")
def big_vocab_parent(tmp_path_factory):
    """Same architecture as the tiny parents, larger vocabulary (another tokenizer)."""
    from conftest import TOKENIZER_CORPUS

    from common.tiny_models import build_tiny_llama, train_word_tokenizer

    tok = train_word_tokenizer([*TOKENIZER_CORPUS, "zebra quokka axolotl narwhal okapi tapir"])
    return build_tiny_llama(tmp_path_factory.mktemp("vocab") / "big", tok, seed=6)


@pytest.mark.parametrize("field,value", [("intermediate_size", 96), ("num_key_value_heads", 4)])
def test_architecture_mismatch(tiny_parents, tiny_tokenizer, tmp_path, field, value):
    from common.tiny_models import build_tiny_llama

    other = build_tiny_llama(tmp_path / "other", tiny_tokenizer, seed=4, **{field: value})
    err = refused(tmp_path, linear(tiny_parents[0], other), f"field {field} is {value}")
    assert "config.json" in str(err)


def test_tensor_names_differ(tiny_parents, tmp_path):
    def rename(ts):
        ts["model.layers.0.mlp.renamed.weight"] = ts.pop("model.layers.0.mlp.up_proj.weight")
        return ts

    other = rewrite(tiny_parents[1], tmp_path / "renamed", rename)
    refused(tmp_path, linear(tiny_parents[0], other), "tensor names differ.*up_proj")


def test_tensor_shapes_differ(tiny_parents, tmp_path):
    def reshape(ts):
        ts["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(64, 32)
        return ts

    other = rewrite(tiny_parents[1], tmp_path / "reshaped", reshape)
    refused(tmp_path, linear(tiny_parents[0], other),
            r"q_proj.weight is \[64, 64\] .* and \[64, 32\]")


def test_vocab_mismatch_names_tensor_and_shapes(tiny_parents, big_vocab_parent, tmp_path):
    a = tiny_parents[0]
    va, vb = load_np(a)[EMBED].shape[0], load_np(big_vocab_parent)[EMBED].shape[0]
    assert vb > va
    refused(tmp_path, linear(a, big_vocab_parent, base_model=str(a)),
            rf"vocabulary size differs: tensor \S+ is \[{va}, 64\] .* \[{vb}, 64\]")


@pytest.mark.parametrize("base_is_small", [True, False], ids=["cut", "fill"])
def test_tokenizer_source_base_keeps_base_vocab(tiny_parents, big_vocab_parent, tmp_path,
                                                base_is_small):
    import json

    from transformers import AutoModelForCausalLM

    small = tiny_parents[0]
    base, other = (small, big_vocab_parent) if base_is_small else (big_vocab_parent, small)
    recipe = linear(base, other, weights=[0.4, 0.6], base_model=str(base),
                    tokenizer_source="base")
    out = tmp_path / "out"
    write_merge(MergeConfig.from_dict(recipe), out)
    B, OT, got = load_np(base), load_np(other), load_written(out)
    rows = B[EMBED].shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    for k in B:
        if k in (EMBED, HEAD):
            o = OT[k][:rows] if OT[k].shape[0] >= rows else np.concatenate(
                [OT[k], B[k][OT[k].shape[0]:]])
        else:
            o = OT[k]
        np.testing.assert_allclose(got[k], ref_linear([B[k], o], [0.4, 0.6]), atol=1e-6)
    assert got[EMBED].shape[0] == rows
    AutoModelForCausalLM.from_pretrained(out)  # loads with the base vocabulary


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_parent(tiny_parents, tmp_path, value, kind):
    other = poisoned(tiny_parents[1], tmp_path / "poisoned", value)
    refused(tmp_path, linear(tiny_parents[0], other), f"tensor {POISONED} contains {kind}")


def test_slerp_t_outside_unit_interval(tiny_parents, tmp_path):
    a, b = tiny_parents
    for t, bad in ((1.5, "1.5"), ([0.0, 1.2], "1.2"), ([{"filter": "mlp", "value": -0.1},
                                                         {"value": 0.5}], "-0.1")):
        recipe = {"models": [str(a), str(b)], "merge_method": "slerp", "base_model": str(a),
                  "parameters": {"t": t}}
        with pytest.raises(FedmergeError, match=rf"t must lie in \[0, 1\], got {bad}"):
            MergeConfig.from_dict(recipe)
    with pytest.raises(FedmergeError, match=r"\[0, 1\]"):
        MergeConfig.two_parent(a, b, "slerp", 1.01)


def test_weights_summing_to_zero(tiny_parents, tmp_path):
    refused(tmp_path, linear(*tiny_parents, weights=[1.0, -1.0]), "weights sum to 0.0")


def test_missing_files(tiny_parents, tmp_path):
    a, b = tiny_parents
    refused(tmp_path, linear(a, tmp_path / "nowhere"), "nowhere: missing model directory")
    no_cfg = shutil.copytree(b, tmp_path / "no_cfg")
    (no_cfg / "config.json").unlink()
    refused(tmp_path, linear(a, no_cfg), r"no_cfg/config.json: missing config.json")
    no_shard = shutil.copytree(b, tmp_path / "no_shard")
    victim = sorted(no_shard.glob("model-*.safetensors"))[1]
    victim.unlink()
    refused(tmp_path, linear(a, no_shard), f"{victim.name}: missing weights file")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(a / "config.json", no_weights)
    refused(tmp_path, linear(a, no_weights), "missing weights: expected model.safetensors")
    with pytest.raises(FedmergeError, match="missing merge recipe"):
        MergeConfig.from_yaml(tmp_path / "absent.yaml")


def test_truncated_and_corrupt_safetensors(tiny_parents, tmp_path):
    a = tiny_parents[0]
    cut = shutil.copytree(a, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-100])
    refused(tmp_path, linear(cut, tiny_parents[1]), "truncated safetensors file")
    bad = shutil.copytree(a, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    refused(tmp_path, linear(bad, tiny_parents[1]), "corrupt safetensors header")
    garbage = shutil.copytree(a, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not a safetensors file at all")
    refused(tmp_path, linear(garbage, tiny_parents[1]), "corrupt or truncated")


def test_output_exists_is_refused(tiny_parents, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FedmergeError, match="already exists"):
        write_merge(MergeConfig.from_dict(linear(*tiny_parents)), tmp_path / "out")


@pytest.mark.parametrize("recipe,match", [
    ({"merge_method": "frankenmerge", "models": ["x"]},
     "unknown method 'frankenmerge' .supported: linear, slerp, task_arithmetic, ties, "
     "dare_linear, dare_ties"),
    ({"merge_method": "linear", "models": ["x"], "slices": []},
     "unknown key 'slices' .supported: models, merge_method, base_model, parameters"),
    ({"merge_method": "ties", "models": [{"model": "x", "parameters": {"weight": 1}}],
      "base_model": "y", "parameters": {"int8_mask": True}},
     "parameters.int8_mask: not a parameter of ties .supported: weight, density, lambda"),
    ({"merge_method": "linear", "models": [{"model": "x", "extra": 1}]},
     r"models\[0\]: unknown key 'extra'"),
    ({"merge_method": "linear", "models": ["x", "y"]},
     r"models\[0\].parameters.weight: required by linear"),
    ({"merge_method": "slerp", "models": ["x", "y", "z"], "base_model": "x",
      "parameters": {"t": 0.5}}, "exactly two models"),
    ({"merge_method": "task_arithmetic", "models": [{"model": "x", "parameters":
                                                      {"weight": 1}}]},
     "base_model: required by task_arithmetic"),
    ({"merge_method": "linear", "models": ["x"], "dtype": "int4"}, "field 'dtype'"),
])
def test_recipe_errors_list_what_is_supported(recipe, match):
    with pytest.raises(FedmergeError, match=match) as exc:
        MergeConfig.from_dict(recipe, source="r.yaml")
    assert str(exc.value).startswith("r.yaml: ")


def test_cli_bad_input_exits_2_with_one_line(tiny_parents, tmp_path, monkeypatch, capsys):
    from common import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - {tiny_parents[0]}\n  - {tiny_parents[1]}\n"
                      f"merge_method: slerp\nbase_model: {tiny_parents[0]}\n"
                      "parameters:\n  t: 2.0\n")
    monkeypatch.setattr(sys, "argv", ["fedmerge", "merge", str(recipe), str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t must lie in [0, 1], got 2.0" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]

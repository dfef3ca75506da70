"""The written merge directory: loads offline and generates, shards, recipe, card, CLI, YAML."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml
from merge_support import load_np, load_written, ref_linear, ref_slerp, set_config

from common.merge.config import MergeConfig
from common.merge.params import interpolate, layer_position
from common.merge.writer import RECIPE_NAME, parse_size, write_merge
from common.model_io import fingerprint

RECIPE_YAML = """\
models:
  - model: {a}
  - model: {b}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5]
    - filter: mlp
      value: 0.7
    - value: 0.25
dtype: float32
"""


@pytest.fixture(scope="module")
def written(tiny_parents, tmp_path_factory):
    a, b = tiny_parents
    root = tmp_path_factory.mktemp("written")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE_YAML.format(a=a, b=b))
    out = root / "merged"
    write_merge(MergeConfig.from_yaml(recipe), out, shard_size="100KB")
    return recipe, out


def test_written_merge_loads_offline_and_generates(written):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = written
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    enc = tok("The patient is diagnosed with sepsis", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 4)
    assert tok.decode(gen[0]).strip()
    sd = model.state_dict()
    disk = load_written(out)
    for k, v in disk.items():  # the loaded model holds exactly the written tensors
        np.testing.assert_array_equal(sd[k].double().numpy(), v)


def test_shards_index_config_tokenizer_recipe_and_card(written, tiny_parents):
    recipe_path, out = written
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert all(f.stat().st_size <= 100_000 + 20_000 for f in shards)  # ≈ shard size + header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(v.nbytes // 2 for v in load_np(out).values())
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((tiny_parents[0] / "config.json").read_text())
    assert cfg["vocab_size"] == src["vocab_size"] and cfg["dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_parents[0] / name).read_bytes()
    assert MergeConfig.from_yaml(out / RECIPE_NAME) == MergeConfig.from_yaml(recipe_path)
    card = (out / "README.md").read_text()
    for parent in tiny_parents:
        assert fingerprint(parent) in card and str(parent) in card
    assert "slerp" in card and "self_attn" in card
    # and the tensors are the recipe's
    A, B = load_np(tiny_parents[0]), load_np(tiny_parents[1])
    got = load_written(out)
    for k in A:
        t = 0.5 * ("layers.1." in k) if "self_attn" in k else 0.7 if "mlp" in k else 0.25
        np.testing.assert_allclose(got[k], ref_slerp(A[k], B[k], t), atol=1e-6, err_msg=k)


def test_fingerprint_is_content_only(tiny_parents, tmp_path):
    a = tiny_parents[0]
    copy = shutil.copytree(a, tmp_path / "elsewhere")
    assert fingerprint(copy) == fingerprint(a)
    set_config(copy, rms_norm_eps=1e-5)
    assert fingerprint(copy) != fingerprint(a)


def test_yaml_round_trip_keeps_every_field(tiny_parents):
    a, b = tiny_parents
    text = """\
models:
  - model: A
    parameters:
      weight: [0.2, 0.8]
      density: 0.5
  - model: B
    parameters:
      weight:
        - filter: mlp
          value: 0.3
        - value: 0.6
merge_method: dare_ties
base_model: C
parameters:
  lambda: 0.9
  normalize: false
  rescale: true
dtype: bfloat16
tokenizer_source: base
"""
    cfg = MergeConfig.from_dict(yaml.safe_load(text))
    again = MergeConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.to_dict() == yaml.safe_load(text)
    two = MergeConfig.two_parent(a, b, "linear", {"attention": 0.1, "mlp": 0.2, "other": 0.3})
    assert MergeConfig.from_dict(yaml.safe_load(two.to_yaml())) == two
    assert two.base_model == str(a)


def test_gradient_and_size_parsing():
    assert layer_position("model.layers.3.mlp.up_proj.weight", 4) == 1.0
    assert layer_position("model.embed_tokens.weight", 4) == 0.0
    assert interpolate([0.0, 1.0, 0.0], 0.25) == pytest.approx(0.5)
    assert interpolate([0.0, 1.0, 0.0], 1.0) == 0.0
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1234") == 1234


def test_cli_merge_writes_and_reports(tiny_parents, tmp_path, monkeypatch, capsys):
    from common import cli

    a, b = tiny_parents
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 3.0}}\nmerge_method: linear\n")
    out = tmp_path / "soup"
    monkeypatch.setattr(sys, "argv", ["fedmerge", "merge", str(recipe), str(out),
                                      "--shard-size", "1MB", "--random-seed", "3"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code in (0, None)
    A, B = load_np(a), load_np(b)
    got = load_written(out)
    for k in A:
        np.testing.assert_allclose(got[k], ref_linear([A[k], B[k]], [1.0, 3.0]), atol=1e-6)
    assert "random seed 3" in (out / "README.md").read_text()


def test_tied_embeddings_merge_and_switch(tiny_tokenizer, tmp_path):
    """Tied checkpoints have no lm_head tensor: the merge keeps the tie and still loads, and the
    switch (writing only embed_tokens) moves the output head with it."""
    from transformers import AutoModelForCausalLM

    from common.merge.switch import InPlaceMerger
    from common.tiny_models import build_tiny_llama

    a, b = (build_tiny_llama(tmp_path / f"tied{s}", tiny_tokenizer, seed=s,
                             tie_word_embeddings=True) for s in (21, 22))
    assert "lm_head.weight" not in load_np(a)
    out = tmp_path / "merged"
    write_merge(MergeConfig.two_parent(a, b, "slerp", 0.4), out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    merger = InPlaceMerger(a, b, method="slerp")
    merger.apply(0.4)
    written = load_written(out)
    emb = merger.model.get_output_embeddings().weight.detach().double().numpy()
    np.testing.assert_allclose(emb, written["model.embed_tokens.weight"], atol=1e-6)
    A, B = load_np(a), load_np(b)
    k = "model.embed_tokens.weight"
    np.testing.assert_allclose(emb, ref_slerp(A[k], B[k], 0.4), atol=1e-6)

"""The built-in demo parents: shipped checkpoints that load and score, a seeded rebuild script,
and corpora that never overlap any site's cohort."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.data.synthetic import generate_cohort
from simulation import build_demo_parents as bdp
from simulation.corpora import CorpusExample, corpus, pretraining_texts
from simulation.demo_parents import demo_parent_dirs


@pytest.fixture(scope="session")
def shipped():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    a_dir, b_dir = demo_parent_dirs()
    tok = AutoTokenizer.from_pretrained(a_dir)
    a = AutoModelForCausalLM.from_pretrained(a_dir).eval()
    b = AutoModelForCausalLM.from_pretrained(b_dir).eval()
    return tok, a, b


def _log_odds(model, tok, texts: list[str]) -> np.ndarray:
    """Next-token log P(yes)/P(no) after the default prompt, left-padded batches."""
    import torch

    from common.scoring.prompt import PromptTemplate

    rows = [PromptTemplate().encode(tok, t, 512)[0] for t in texts]
    yes, no = bdp._answer_ids(tok)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            ids, mask = bdp._left_pad(rows[i : i + 64], tok.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            out.append((logits[:, yes] - logits[:, no]).double().numpy())
    return np.concatenate(out)


def test_shipped_parents_are_small_mergeable_toys():
    a_dir, b_dir = demo_parent_dirs()
    size = sum(f.stat().st_size for d in (a_dir, b_dir) for f in d.iterdir())
    assert size <= 20 * 2**20
    for d in (a_dir, b_dir):
        card = (d / "README.md").read_text()
        assert "No clinical validity" in card and "toy" in card.lower()
        assert json.loads((d / "config.json").read_text())["model_type"] == "llama"
    # Same tokenizer and architecture: a merge is defined tensor by tensor.
    assert (a_dir / "tokenizer.json").read_bytes() == (b_dir / "tokenizer.json").read_bytes()
    assert (a_dir / "config.json").read_bytes() == (b_dir / "config.json").read_bytes()


def test_shipped_parents_score_and_know_their_own_task(shipped):
    tok, a, b = shipped
    # Fresh examples: a corpus seed the build never used.
    numeric = corpus("numeric", 150, seed=99)
    clinical = corpus("clinical", 150, seed=99)
    auc = {}
    for name, model in (("a", a), ("b", b)):
        for task, examples in (("numeric", numeric), ("clinical", clinical)):
            scores = _log_odds(model, tok, [e.text for e in examples])
            assert np.isfinite(scores).all()
            auc[name, task] = roc_auc_score([e.label for e in examples], scores)
    assert auc["a", "numeric"] > 0.85 and auc["b", "clinical"] > 0.85, auc
    # Each parent knows only its half: near chance on the other corpus.
    assert auc["a", "clinical"] < 0.7 and auc["b", "numeric"] < 0.7, auc


def test_shipped_parents_merge_beats_both_on_cohort_sample(shipped):
    """A linear midpoint of the parents ranks mortality better than either parent."""
    tok, a, b = shipped
    cohort = generate_cohort(seed=5, stays_per_site=[150, 150, 150])
    texts, y = [r.text for r in cohort], [r.label for r in cohort]
    auc_a = roc_auc_score(y, _log_odds(a, tok, texts))
    auc_b = roc_auc_score(y, _log_odds(b, tok, texts))
    sa, sb = a.state_dict(), b.state_dict()
    mid = type(a)(a.config).eval()
    mid.load_state_dict({k: 0.4 * sa[k] + 0.6 * sb[k] for k in sa})
    auc_mid = roc_auc_score(y, _log_odds(mid, tok, texts))
    assert auc_mid > max(auc_a, auc_b) + 0.01, (auc_a, auc_b, auc_mid)


def test_corpora_and_cohorts_share_no_record():
    cfg = bdp.BuildConfig()
    corpus_texts = {
        e.text for task in ("numeric", "clinical") for e in corpus(task, cfg.finetune_examples)
    }
    corpus_texts |= set(pretraining_texts(cfg.pretrain_texts))
    for seed in (2025, 1, 7):  # the default cohort, the corpus seed, another
        cohort = generate_cohort(seed=seed)
        assert corpus_texts.isdisjoint(r.text for r in cohort)


def test_corpora_are_deterministic_and_balanced():
    first = corpus("numeric", 300)
    assert first == corpus("numeric", 300)
    assert first != corpus("numeric", 300, seed=2)
    for task in ("numeric", "clinical"):
        rate = np.mean([e.label for e in corpus(task, 600)])
        assert 0.3 < rate < 0.7, (task, rate)
    assert isinstance(first[0], CorpusExample)


def test_reduced_rebuild_end_to_end_is_seeded(tmp_path):
    from transformers import AutoModelForCausalLM

    from simulation.demo_parents.cards import ROLES

    bdp.main(["--reduced", "--out", str(tmp_path / "one"), "--keep-base"])
    bdp.main(["--reduced", "--out", str(tmp_path / "two")])
    for name in (bdp.PARENT_A_NAME, bdp.PARENT_B_NAME):
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
        assert ROLES[name][0] in (one / "README.md").read_text()
        model = AutoModelForCausalLM.from_pretrained(one)
        assert model.config.hidden_size == bdp.BuildConfig.reduced().hidden_size
    assert (tmp_path / "one" / "base" / "config.json").is_file()
    # Nothing half-written left behind: only the finished folders.
    expected = [bdp.PARENT_A_NAME, bdp.PARENT_B_NAME]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == expected


def test_failed_rebuild_leaves_previous_parents_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    bdp.main(["--reduced", "--out", str(out)])
    before = (out / bdp.PARENT_A_NAME / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(bdp, "_finetune", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        bdp.main(["--reduced", "--out", str(out)])
    assert (out / bdp.PARENT_A_NAME / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [bdp.PARENT_A_NAME, bdp.PARENT_B_NAME]


def test_demo_parents_cli_path():
    from typer.testing import CliRunner

    from common.cli import app

    result = CliRunner().invoke(app, ["demo-parents", "path"])
    assert result.exit_code == 0, result.output
    assert [Path(p) for p in result.output.split()] == list(demo_parent_dirs())

"""Yes/no scoring on real tiny Llama checkpoints: batching, truncation, templates, answers."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import FedmergeError
from common.records import PatientRecord
from common.scoring import AnswerTokens, ParityScorer, PromptTemplate, YesNoScorer, parse_answer
from common.scoring.batching import budget_batches, fixed_batches, left_pad
from tests.conftest import TOKENIZER_CORPUS


def make_records(n: int, seed: int = 0, max_sentences: int = 12) -> list[PatientRecord]:
    """Patient texts of mixed lengths built from the vocabulary's own sentences."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, max_sentences + 1))
        text = " ".join(TOKENIZER_CORPUS[j] for j in rng.integers(0, len(TOKENIZER_CORPUS), k))
        out.append(PatientRecord(stay_id=f"s{i}", label=int(rng.random() < 0.3), text=text))
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_parents):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_parents[0], dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def records():
    return make_records(16)


def test_batched_scores_equal_one_at_a_time(tiny_model, tiny_tokenizer, records):
    # max_padding=1 lets rows of very different lengths share a batch: real left padding.
    batched = YesNoScorer(tiny_model, tiny_tokenizer, batch_tokens=4096, max_padding=1.0)
    alone = YesNoScorer(tiny_model, tiny_tokenizer, batch_tokens=1)
    prep_b, prep_a = batched.prepare(records), alone.prepare(records)
    assert prep_b.padding_fraction > 0.2 and len(prep_b.batches) < 4
    assert len(prep_a.batches) == len(records) and prep_a.padding_fraction == 0.0
    sb, sa = batched.score(prep_b), alone.score(prep_a)
    assert sb.dtype == np.float64 and sb.shape == (len(records),)
    np.testing.assert_allclose(sb, sa, atol=1e-4, rtol=0)
    assert np.std(sa) > 1e-3  # different prompts give different scores
    default = YesNoScorer(tiny_model, tiny_tokenizer)
    prep_d = default.prepare(records)
    assert prep_d.padding_fraction <= 0.1
    np.testing.assert_allclose(default.score(prep_d), sa, atol=1e-4, rtol=0)


def test_log_odds_equal_full_vocabulary_logits(tiny_model, tiny_tokenizer, records):
    import torch

    scorer = YesNoScorer(tiny_model, tiny_tokenizer)
    got = scorer.score(scorer.prepare(records[:5]))
    yes, no = list(scorer.answers.yes_ids), list(scorer.answers.no_ids)
    for rec, value in zip(records[:5], got, strict=True):
        ids, _ = scorer.template.encode(tiny_tokenizer, rec.text, 512)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
        want = torch.logsumexp(logits[yes], 0) - torch.logsumexp(logits[no], 0)
        assert value == pytest.approx(float(want), abs=1e-5)


def test_score_reads_current_weights(tiny_parents, tiny_tokenizer, records):
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_parents[0], dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_parents[1], dtype=torch.float32)
    scorer = YesNoScorer(a, tiny_tokenizer)
    prepared = scorer.prepare(records[:8])
    before = scorer.score(prepared)
    with torch.no_grad():  # an in-place switch, as the node's merger does
        for name, tensor in a.state_dict().items():
            tensor.copy_(b.state_dict()[name])
    after = scorer.score(prepared)
    fresh = YesNoScorer(b, tiny_tokenizer)
    np.testing.assert_allclose(after, fresh.score(fresh.prepare(records[:8])), atol=1e-6)
    assert np.abs(after - before).max() > 1e-3


def test_truncation_cuts_patient_text_and_keeps_question(tiny_tokenizer):
    template = PromptTemplate()
    prefix, suffix = template.template.split("{patient_data}")
    short = "The patient is diagnosed with sepsis ."
    ids, cut = template.encode(tiny_tokenizer, short, 512)
    assert not cut
    assert ids == tiny_tokenizer(prefix + short + suffix)["input_ids"]  # untruncated = plain
    long_text = " ".join(TOKENIZER_CORPUS * 200)  # thousands of tokens
    ids, cut = template.encode(tiny_tokenizer, long_text, 50)
    n_prefix = len(tiny_tokenizer(prefix)["input_ids"])  # with BOS
    n_suffix = len(tiny_tokenizer(suffix, add_special_tokens=False)["input_ids"])
    assert cut and len(ids) == n_prefix + 50 + n_suffix
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids[-n_suffix:] == tiny_tokenizer(suffix, add_special_tokens=False)["input_ids"]
    tail = tiny_tokenizer.decode(ids[-n_suffix:])
    assert "die during the ICU stay ? Answer ( yes or no" in tail
    head = tiny_tokenizer.decode(ids[:n_prefix], skip_special_tokens=True)
    assert head.startswith("You are a very helpful healthcare assistant")
    kept = tiny_tokenizer.decode(ids[n_prefix : n_prefix + 50])
    assert kept.startswith("The patient is diagnosed with sepsis")  # the head of the text


def test_truncated_prompt_scores_without_error(tiny_model, tiny_tokenizer):
    rec = PatientRecord(stay_id="long", label=1, text=" ".join(TOKENIZER_CORPUS * 300))
    scorer = YesNoScorer(tiny_model, tiny_tokenizer, max_patient_tokens=64)
    prepared = scorer.prepare([rec])
    assert prepared.truncated == 1 and prepared.lengths[0] < 64 + 60
    assert np.isfinite(scorer.score(prepared)).all()


def test_chat_template_path(tiny_model, tiny_tokenizer, records):
    chat = PromptTemplate(use_chat_template=True)
    ids, _ = chat.encode(tiny_tokenizer, records[0].text, 512)
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<s> user : You are a very helpful")
    assert text.endswith("Answer ( yes or no <unk> </s> <s> assistant :")  # "):" is not in vocab
    assert ids.count(tiny_tokenizer.bos_token_id) == 2  # from the template, none added on top
    ids_cut, cut = chat.encode(tiny_tokenizer, " ".join(TOKENIZER_CORPUS * 50), 20)
    assert cut and tiny_tokenizer.decode(ids_cut).endswith("</s> <s> assistant :")
    batched = YesNoScorer(tiny_model, tiny_tokenizer, template=chat, max_padding=1.0)
    alone = YesNoScorer(tiny_model, tiny_tokenizer, template=chat, batch_tokens=1)
    sc = batched.score(batched.prepare(records))
    np.testing.assert_allclose(sc, alone.score(alone.prepare(records)), atol=1e-4)
    plain = YesNoScorer(tiny_model, tiny_tokenizer)
    assert np.abs(sc - plain.score(plain.prepare(records))).max() > 1e-3


def test_chat_template_missing_is_one_clear_error(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(FedmergeError, match="chat_template is missing"):
        PromptTemplate(use_chat_template=True).encode(tok, "x", 10)
    with pytest.raises(ValueError, match="expected exactly one"):
        PromptTemplate(template="no slot here")


def test_answer_tokens_are_single_known_tokens(tiny_tokenizer):
    answers = AnswerTokens.from_tokenizer(tiny_tokenizer)
    words = {"yes", "Yes", "YES", "no", "No", "NO"}
    for tid in answers.ids:
        word = tiny_tokenizer.decode([tid])
        assert word in words
        assert tiny_tokenizer.encode(word, add_special_tokens=False) == [tid]
        assert tiny_tokenizer.encode(" " + word, add_special_tokens=False) == [tid]
    assert len(answers.yes_ids) == 3 and len(answers.no_ids) == 3
    assert not set(answers.yes_ids) & set(answers.no_ids)


def test_answer_tokens_with_byte_level_bpe():
    """Spacing variants are distinct ids in byte-level BPE; both must be kept."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["yes no Yes No", "answer yes or no", "yes yes no no"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    answers = AnswerTokens.from_tokenizer(fast)
    decoded = {fast.decode([t]) for t in answers.yes_ids}
    assert {"yes", " yes"} <= decoded
    assert {"no", " no"} <= {fast.decode([t]) for t in answers.no_ids}
    for tid in answers.ids:
        assert len(fast.encode(fast.decode([tid]), add_special_tokens=False)) == 1


def test_answer_tokens_refuse_unknown_and_special(tiny_tokenizer):
    with pytest.raises(FedmergeError, match="single known token"):
        AnswerTokens.from_tokenizer(tiny_tokenizer, yes_words=("affirmative",))
    unk = tiny_tokenizer.unk_token_id
    yes = tiny_tokenizer.encode("yes", add_special_tokens=False)[0]
    no = tiny_tokenizer.encode("no", add_special_tokens=False)[0]
    with pytest.raises(FedmergeError, match="special or unknown"):
        AnswerTokens.from_ids(tiny_tokenizer, [yes, unk], [no])
    with pytest.raises(FedmergeError, match=r"expected an id in \[0, "):
        AnswerTokens.from_ids(tiny_tokenizer, [yes], [10**6])
    with pytest.raises(FedmergeError, match="in both"):
        AnswerTokens.from_ids(tiny_tokenizer, [yes, no], [no])
    assert AnswerTokens.from_ids(tiny_tokenizer, [yes], [no]).ids == (yes, no)


def test_budget_batches_invariants():
    rng = np.random.default_rng(5)
    lengths = [int(x) for x in rng.integers(64, 513, 300)]
    batches = budget_batches(lengths, 4096)
    assert sorted(i for b in batches for i in b) == list(range(300))
    padded = real = 0
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 4096
        pad = sum(longest - lengths[i] for i in b)
        assert pad <= 0.1 * len(b) * longest
        padded, real = padded + len(b) * longest, real + sum(lengths[i] for i in b)
    assert 1 - real / padded < 0.05
    assert budget_batches([5000, 10], 4096) == [[0], [1]]  # too long: a batch of its own
    assert fixed_batches(5, 2) == [[0, 1], [2, 3], [4]]


def test_left_pad_positions_follow_the_mask():
    batch = left_pad((7, 3), [[5, 6, 7], [9]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.rows == (7, 3) and batch.real_tokens == 4 and batch.padded_tokens == 6


@pytest.mark.parametrize(
    ("text", "want"),
    [("yes", 1), (" Yes.", 1), ("died", 1), ("1", 1), ("no", 0), (" survived", 0),
     ("alive", 0), ("0", 0), ("patient died", 1), ("maybe", -1), ("", -1), ("10", -1)],
)
def test_parse_answer(text, want):
    assert parse_answer(text) == want


def test_parity_path_first_step_matches_scorer(tiny_model, tiny_tokenizer, records):
    parity = ParityScorer(tiny_model, tiny_tokenizer, batch_size=8)
    result = parity.run(records)
    scorer = YesNoScorer(tiny_model, tiny_tokenizer)
    np.testing.assert_allclose(result.log_odds, scorer.score(scorer.prepare(records)), atol=1e-4)
    assert set(result.predictions.tolist()) <= {-1, 0, 1}
    assert len(result.answers) == len(records)
    expected = [parse_answer(a) for a in result.answers]
    assert result.predictions.tolist() == expected
    assert result.padding_fraction > 0.2  # naive batching pads mixed lengths heavily


def test_empty_dataset_and_bad_budget_are_refused(tiny_model, tiny_tokenizer):
    with pytest.raises(FedmergeError, match="empty"):
        YesNoScorer(tiny_model, tiny_tokenizer).prepare([])
    with pytest.raises(FedmergeError, match="batch_tokens"):
        YesNoScorer(tiny_model, tiny_tokenizer, batch_tokens=0)


def test_shared_prefix_is_reused_with_the_same_numbers(
    tiny_model, tiny_tokenizer, records, monkeypatch
):
    import common.scoring.scorer as scorer_mod

    reuse = YesNoScorer(tiny_model, tiny_tokenizer, max_padding=1.0)
    plain = YesNoScorer(tiny_model, tiny_tokenizer, reuse_prefix=False)
    prep = reuse.prepare(records)
    prefix, _ = PromptTemplate().template.split("{patient_data}")
    assert list(prep.shared_prefix) == tiny_tokenizer(prefix)["input_ids"]
    assert not plain.prepare(records).shared_prefix
    want = plain.score(plain.prepare(records))
    np.testing.assert_allclose(reuse.score(prep), want, atol=1e-4)
    # The fallback for models whose cache cannot be shared: prefix prepended to every row.
    original = scorer_mod._Prefix.__init__

    def no_cache(self, body, ids, device):
        original(self, body, ids, device)
        self.kv = None

    monkeypatch.setattr(scorer_mod._Prefix, "__init__", no_cache)
    np.testing.assert_allclose(reuse.score(prep), want, atol=1e-4)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_last_layer_for_last_position_only_gives_the_same_numbers(
    tiny_model, tiny_tokenizer, records, reuse_prefix
):
    from common.scoring.last_layer import last_position_only

    kw = dict(max_padding=1.0, reuse_prefix=reuse_prefix)
    pruned = YesNoScorer(tiny_model, tiny_tokenizer, **kw)
    stock = YesNoScorer(tiny_model, tiny_tokenizer, prune_last_layer=False, **kw)
    prep = pruned.prepare(records)
    assert prep.padding_fraction > 0.2  # padded rows go through the pruned layer too
    np.testing.assert_allclose(pruned.score(prep), stock.score(prep), atol=1e-5)
    with last_position_only(tiny_model.model) as active:
        assert active and "forward" in vars(tiny_model.model.layers[-1])
    assert "forward" not in vars(tiny_model.model.layers[-1])  # restored

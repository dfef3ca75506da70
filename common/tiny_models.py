"""Tiny Llama checkpoints built offline, for tests, benchmarks and the demo.

Nothing may be downloaded at run time, so fedmerge makes its own small models: a word-level
tokenizer trained with `tokenizers` on text we provide, and a randomly initialised (or later
fine-tuned) `LlamaForCausalLM` saved with `save_pretrained`, exactly like a hub checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

# A chat template in the shape real instruct models ship, so the chat-template path is testable.
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}"
)

# Words every fedmerge prompt and answer needs, whatever corpus the vocabulary is trained on.
BASE_WORDS = (
    "yes no Yes No YES NO died survived alive dead 0 1 2 3 4 5 6 7 8 9 . , ; : ? ! ( ) - / % "
    "You are a very helpful healthcare assistant . Answer only yes or no . Given the patient's "
    "hospital profile below , did the patient die during the ICU stay ? Answer ( yes or no ) : "
    "The patient is diagnosed with chart events mesured are mean amounts of medications "
    "administered during episode procedures performed outputs collected for of and the a an "
    "user assistant system ' s Did"
)


def train_word_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 1):
    """A word-level fast tokenizer: words and punctuation are tokens, digits are split.

    Splitting digits keeps every number representable with a small vocabulary, which is what
    vitals and lab values need.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    corpus = [BASE_WORDS, *texts]
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    """The smallest Llama that still exercises every code path (GQA, 2 layers, untied head)."""
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_tiny_llama(
    out_dir: str | Path,
    tokenizer,
    *,
    seed: int,
    max_shard_size: str | int | None = None,
    init_std: float = 0.02,
    **config_overrides,
) -> Path:
    """Write a random tiny Llama checkpoint with `tokenizer` to `out_dir` and return the path."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(len(tokenizer), initializer_range=init_std, **config_overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out

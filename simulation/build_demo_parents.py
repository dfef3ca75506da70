"""Rebuild the demo parents from scratch: tokenizer, base, and two fine-tuned parents.

`python -m simulation.build_demo_parents [--out DIR] [--reduced]`

The shipped checkpoints must be reproducible by anyone, on a CPU, in minutes, from nothing but
fedmerge's own synthetic corpora. Everything is seeded (corpora, initialisation, batch order)
and runs in fp32 on CPU with a plain torch loop, so the same command gives the same weights on
the same torch build. Steps:
1. a word-level tokenizer over the corpora's vocabulary (digits split);
2. a tiny Llama base, language-modelled briefly on unlabelled texts in the patient encoding;
3. parent A (numeric) and parent B (clinical), each fine-tuned from that SAME base on its corpus
   in the scorer's prompt format, the answer being the next token after the question cue.
Fine-tuning both from one base keeps them in one basin, which is what makes their interpolation
meaningful (as for PatientDx's parents, which share their pre-training lineage).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from simulation.demo_parents import PARENT_A_NAME, PARENT_B_NAME


class BuildConfig(BaseModel):
    """Sizes and schedule of one build; `reduced()` is the seconds-long variant tests run."""

    model_config = ConfigDict(frozen=True)

    seed: int = 2024
    corpus_seed: int = 1
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    pretrain_texts: int = 4000
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    finetune_examples: int = 6000
    finetune_steps: int = 250
    finetune_lr: float = 1e-3
    batch_size: int = 32
    max_patient_tokens: int = 200
    max_position_embeddings: int = 512

    @classmethod
    def reduced(cls) -> BuildConfig:
        return cls(
            hidden_size=32,
            intermediate_size=64,
            pretrain_texts=64,
            pretrain_steps=3,
            finetune_examples=64,
            finetune_steps=3,
            batch_size=8,
        )


def _answer_ids(tokenizer) -> tuple[int, int]:
    """Ids of the single tokens `yes` and `no`; refuse a tokenizer that splits or lacks them."""
    from common.errors import FedmergeError

    ids = []
    for word in ("yes", "no"):
        enc = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            raise FedmergeError(f"demo tokenizer: '{word}' is {enc}, expected one known token")
        ids.append(enc[0])
    return ids[0], ids[1]


def _batches(n: int, batch_size: int, steps: int, generator):
    """`steps` index batches, reshuffling every epoch with the seeded generator."""
    import torch

    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size].tolist()
        order = order[batch_size:]


def _left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _pretrain(model, tokenizer, texts: list[str], cfg: BuildConfig, log) -> None:
    """Causal language modelling on the patient encoding, so numbers and words get embeddings
    that both fine-tunes start from."""
    import torch

    rows = [tokenizer(t)["input_ids"] for t in texts]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.pretrain_lr, total_steps=max(cfg.pretrain_steps, 1), pct_start=0.1
    )
    model.train()
    for step, idx in enumerate(_batches(len(rows), cfg.batch_size, cfg.pretrain_steps, gen)):
        ids, mask = _left_pad([rows[i] for i in idx], tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.pretrain_steps - 1:
            log(f"base step {step + 1}/{cfg.pretrain_steps} lm loss {loss.item():.3f}")
    model.eval()


def _finetune(model, tokenizer, examples, cfg: BuildConfig, seed: int, name: str, log) -> None:
    """Next-token cross-entropy on the answer only, in the scorer's prompt format."""
    import torch

    from common.scoring.prompt import PromptTemplate

    template = PromptTemplate()
    yes_id, no_id = _answer_ids(tokenizer)
    rows = [template.encode(tokenizer, e.text, cfg.max_patient_tokens)[0] for e in examples]
    targets = torch.tensor([yes_id if e.label else no_id for e in examples])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.finetune_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.finetune_lr, total_steps=max(cfg.finetune_steps, 1), pct_start=0.1
    )
    model.train()
    for step, idx in enumerate(_batches(len(rows), cfg.batch_size, cfg.finetune_steps, gen)):
        ids, mask = _left_pad([rows[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, targets[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == cfg.finetune_steps - 1:
            log(f"{name} step {step + 1}/{cfg.finetune_steps} answer loss {loss.item():.3f}")
    model.eval()


def build(out_dir: Path, cfg: BuildConfig, *, log=print, keep_base: bool = False) -> dict:
    """Build into a temporary sibling of `out_dir`, then move the parents into place."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from common.scoring.prompt import DEFAULT_TEMPLATE
    from common.tiny_models import tiny_llama_config, train_word_tokenizer
    from simulation.corpora import corpus, pretraining_texts, vocabulary_text
    from simulation.demo_parents.cards import write_card

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    numeric = corpus("numeric", cfg.finetune_examples, seed=cfg.corpus_seed)
    clinical = corpus("clinical", cfg.finetune_examples, seed=cfg.corpus_seed)
    texts = pretraining_texts(cfg.pretrain_texts, seed=cfg.corpus_seed)
    tokenizer = train_word_tokenizer([DEFAULT_TEMPLATE, vocabulary_text(), *texts])
    config = tiny_llama_config(
        len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    base = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in base.parameters())
    log(f"vocabulary {len(tokenizer)}, {n_params:,} parameters")
    _pretrain(base, tokenizer, texts, cfg, log)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    tmp = Path(tempfile.mkdtemp(prefix=".demo-parents-", dir=out_dir))
    try:
        built = {}
        for name, examples, seed in (
            (PARENT_A_NAME, numeric, cfg.seed + 10),
            (PARENT_B_NAME, clinical, cfg.seed + 20),
        ):
            base.load_state_dict(base_state)
            _finetune(base, tokenizer, examples, cfg, seed, name, log)
            base.save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
            write_card(tmp / name, name, cfg, n_params)
            # save_pretrained writes weights 0600; shipped files must be readable by all.
            for f in (tmp / name).glob("*.safetensors"):
                f.chmod(0o644)
            built[name] = tmp / name
        if keep_base:
            base.load_state_dict(base_state)
            base.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            built["base"] = tmp / "base"
        final = {}
        for name, path in built.items():
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            final[name] = target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    log(f"built {', '.join(final)} in {out_dir} in {seconds:.0f} s")
    return {"dirs": final, "seconds": seconds, "parameters": n_params}


def main(argv: list[str] | None = None) -> None:
    import argparse

    from simulation.demo_parents import PACKAGE_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="output directory")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, a few steps")
    parser.add_argument("--keep-base", action="store_true", help="also write the base model")
    args = parser.parse_args(argv)
    from common.flower_runtime import set_offline_defaults

    set_offline_defaults()
    cfg = BuildConfig.reduced() if args.reduced else BuildConfig()
    build(args.out, cfg, keep_base=args.keep_base)


if __name__ == "__main__":
    main()

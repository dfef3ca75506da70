"""Log-odds of "yes" over "no" for each patient, from one forward pass per prompt.

The hospital node scores the same records under many merge coefficients, so tokenization and
batching happen once (`prepare`) and each `score` call only runs the model, reading whatever
weights it holds at that moment (the node rewrites them in place between calls). Only the
last position's hidden state is projected, and only onto the answer tokens' rows of the output
matrix: full-vocabulary logits at every position are most of the memory and much of the time
for 32k-128k vocabularies, and none of it is needed for P(yes). The instruction every prompt
starts with is run once per call and its keys/values reused by every batch (causal attention
makes them independent of what follows), instead of being recomputed for every stay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from common.errors import FedmergeError
from common.scoring.answer_tokens import AnswerTokens
from common.scoring.batching import (
    MAX_PADDING,
    PaddedBatch,
    budget_batches,
    left_pad,
    padding_fraction,
)
from common.scoring.last_layer import last_position_only
from common.scoring.prompt import PromptTemplate


@dataclass(frozen=True)
class PreparedDataset:
    """Tokenized, batched records; reusable for every weight setting of the same model."""

    stay_ids: tuple[str, ...]
    labels: np.ndarray  # int8, 0/1, records' order
    lengths: np.ndarray  # prompt tokens per record, shared prefix included
    truncated: int  # records whose patient text was cut to the budget
    batches: tuple[PaddedBatch, ...]  # the tokens after the shared prefix
    padding_fraction: float  # of the batches' tokens
    shared_prefix: tuple[int, ...] = ()  # leading ids common to every prompt, computed once

    def __len__(self) -> int:
        return len(self.stay_ids)


def pad_id_of(tokenizer) -> int:
    """The id to pad with; any id works under the mask, so fall back to EOS, then 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_records(records, tokenizer, template: PromptTemplate, max_patient_tokens: int):
    """Prompt ids per record and how many were truncated (shared with the parity path)."""
    seqs: list[list[int]] = []
    truncated = 0
    for rec in records:
        ids, cut = template.encode(tokenizer, rec.text, max_patient_tokens)
        seqs.append(ids)
        truncated += cut
    return seqs, truncated


# Below this many common leading tokens a separate prefix pass is not worth its overhead.
MIN_SHARED_PREFIX = 4


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Leading tokens every sequence shares, leaving each at least one token of its own."""
    if not seqs:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def decoder_of(model):
    """The transformer body that returns hidden states (Llama's `model.model`)."""
    body = getattr(model, "model", None)
    if body is None and hasattr(model, "get_decoder"):
        body = model.get_decoder()
    if body is None:
        raise FedmergeError(
            f"model {type(model).__name__}: no decoder body (.model); expected a causal LM"
        )
    return body


def answer_log_odds(hidden, head, ids, n_yes: int, softcap: float | None):
    """logsumexp(yes logits) − logsumexp(no logits) from final hidden states [rows, hidden]."""
    import torch

    # In fp32 even under bf16 autocast: the answer is a difference of nearby logits.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        weight = head.weight.index_select(0, ids).float()
        logits = hidden.float() @ weight.T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.index_select(0, ids).float()
        if softcap:  # Gemma-2 style final logit soft-capping changes the ratio, so apply it
            logits = softcap * torch.tanh(logits / softcap)
        return torch.logsumexp(logits[:, :n_yes], -1) - torch.logsumexp(logits[:, n_yes:], -1)


def autocast_for(device):
    """bf16 autocast on CUDA; CPU stays fp32, its fast path (bf16 is 4-10x slower there)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


class YesNoScorer:
    """Scores records as log P(yes)/P(no) of the next token after the prompt."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: PromptTemplate | None = None,
        batch_tokens: int = 4096,
        max_patient_tokens: int = 512,
        device=None,
        answer_tokens: AnswerTokens | None = None,
        max_padding: float = MAX_PADDING,
        reuse_prefix: bool = True,
        prune_last_layer: bool = True,
    ):
        import torch

        if batch_tokens < 1:
            raise FedmergeError(f"batch_tokens: got {batch_tokens}; expected >= 1")
        if max_patient_tokens < 0:
            raise FedmergeError(f"max_patient_tokens: got {max_patient_tokens}; expected >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self.batch_tokens = batch_tokens
        self.max_patient_tokens = max_patient_tokens
        self.max_padding = max_padding
        self.reuse_prefix = reuse_prefix
        self.prune_last_layer = prune_last_layer
        self.answers = answer_tokens or AnswerTokens.from_tokenizer(tokenizer)
        rows = model.get_output_embeddings().weight.shape[0]
        if max(self.answers.ids) >= rows:
            raise FedmergeError(
                f"answer tokens: id {max(self.answers.ids)} is beyond the model's {rows} output "
                "rows; expected the tokenizer saved with this model"
            )
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if param.device != self.device:
            model.to(self.device)
        model.eval()

    def prepare(self, records: Sequence) -> PreparedDataset:
        """Tokenize and batch once; the result is valid for any weights of this model."""
        if not records:
            raise FedmergeError("records: the dataset is empty; expected at least one stay")
        seqs, truncated = encode_records(
            records, self.tokenizer, self.template, self.max_patient_tokens
        )
        lengths = [len(s) for s in seqs]
        shared = common_prefix_length(seqs) if self.reuse_prefix else 0
        rest = [s[shared:] for s in seqs]
        pad = pad_id_of(self.tokenizer)
        batches = tuple(
            left_pad(rows, [rest[i] for i in rows], pad)
            for rows in budget_batches([len(s) for s in rest], self.batch_tokens, self.max_padding)
        )
        return PreparedDataset(
            stay_ids=tuple(r.stay_id for r in records),
            labels=np.array([r.label for r in records], dtype=np.int8),
            lengths=np.array(lengths, dtype=np.int64),
            truncated=truncated,
            batches=batches,
            padding_fraction=padding_fraction(batches),
            shared_prefix=tuple(seqs[0][:shared]),
        )

    def score(
        self, prepared: PreparedDataset, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Log-odds per record in the records' order, from the model's current weights.

        `progress`, if given, is called with the number of rows finished after each batch.
        """
        import torch

        body = decoder_of(self.model)
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        ids = torch.as_tensor(self.answers.ids, device=self.device)
        n_yes = len(self.answers.yes_ids)
        out = np.empty(len(prepared), dtype=np.float64)
        with torch.inference_mode(), autocast_for(self.device):
            prefix = _Prefix(body, prepared.shared_prefix, self.device)
            with last_position_only(body, self.prune_last_layer):
                self._run(body, head, ids, n_yes, softcap, prefix, prepared, out, progress)
        if not np.all(np.isfinite(out)):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise FedmergeError(
                f"scores: stay {prepared.stay_ids[bad]!r} got a non-finite log-odds; "
                "expected finite model outputs (check the weights for NaN/inf)"
            )
        return out

    @staticmethod
    def _run(body, head, ids, n_yes, softcap, prefix, prepared, out, progress) -> None:
        for batch in prepared.batches:
            hidden = body(**prefix.inputs(batch)).last_hidden_state[:, -1]
            log_odds = answer_log_odds(hidden, head, ids, n_yes, softcap)
            out[list(batch.rows)] = log_odds.double().cpu().numpy()
            if progress is not None:
                progress(len(batch.rows))


class _Prefix:
    """The shared prefix, run once with the current weights, joined to each batch.

    Its keys/values are reused when the model's cache is the plain per-layer kind; otherwise
    (sliding-window or other special layers) the prefix ids are prepended to every row instead,
    which gives the same numbers at the cost of recomputing them. Left padding then sits between
    the prefix and the row's own tokens, where the mask hides it and positions skip it.
    """

    def __init__(self, body, ids: tuple[int, ...], device):
        import torch
        from transformers.cache_utils import DynamicCache, DynamicLayer

        self.device = device
        self.ids = torch.tensor([ids], dtype=torch.long, device=device) if ids else None
        self.kv = None
        self._cache = DynamicCache
        if self.ids is None:
            return
        cache = body(input_ids=self.ids, use_cache=True).past_key_values
        layers = getattr(cache, "layers", None)
        if layers and all(type(layer) is DynamicLayer for layer in layers):
            self.kv = [(layer.keys, layer.values) for layer in layers]

    def inputs(self, batch: PaddedBatch) -> dict:
        import torch

        dev = self.device
        ids = batch.input_ids.to(dev, non_blocking=True)
        mask = batch.attention_mask.to(dev, non_blocking=True)
        pos = batch.position_ids.to(dev, non_blocking=True)
        if self.ids is None:
            return dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        rows, width = ids.shape[0], self.ids.shape[1]
        mask = torch.cat([mask.new_ones(rows, width), mask], dim=1)
        pos = pos + width
        if self.kv is not None:
            past = self._cache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                for k, v in self.kv])
            return dict(input_ids=ids, attention_mask=mask, position_ids=pos,
                        past_key_values=past, use_cache=True)
        first = torch.arange(width, device=dev).expand(rows, width)
        return dict(input_ids=torch.cat([self.ids.expand(rows, width), ids], dim=1),
                    attention_mask=mask, position_ids=torch.cat([first, pos], dim=1),
                    use_cache=False)


def p_yes(log_odds: np.ndarray) -> np.ndarray:
    """P(yes) restricted to the answer tokens: the logistic of the log-odds."""
    return 1.0 / (1.0 + np.exp(-np.asarray(log_odds, dtype=np.float64)))

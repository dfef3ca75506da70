"""The PatientDx scoring path, kept to reproduce the paper and to measure the scorer against.

The paper generated two tokens per prompt and parsed them for a positive word (yes, died, 1) or a
negative one (no, survived, alive, 0); AUROC came from those parsed answers and AUPRC from the
probabilities of the yes/no tokens at the first generated step. Batching is naive on purpose
(dataset order, a fixed number of rows padded to the longest), as a generation pipeline does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.errors import FedmergeError
from common.scoring.answer_tokens import AnswerTokens
from common.scoring.batching import fixed_batches, left_pad, padding_fraction
from common.scoring.prompt import PromptTemplate
from common.scoring.scorer import autocast_for, encode_records, pad_id_of

POSITIVE_WORDS = frozenset({"yes", "died", "1"})
NEGATIVE_WORDS = frozenset({"no", "survived", "alive", "0"})
_WORD = re.compile(r"[a-z]+|[0-9]+")


def parse_answer(text: str) -> int:
    """1 for a positive answer, 0 for a negative one, -1 if the first known word is neither."""
    for word in _WORD.findall(text.lower()):
        if word in POSITIVE_WORDS:
            return 1
        if word in NEGATIVE_WORDS:
            return 0
    return -1


@dataclass(frozen=True)
class ParityResult:
    """Per record, in the records' order."""

    stay_ids: tuple[str, ...]
    labels: np.ndarray  # int8
    answers: tuple[str, ...]  # the two generated tokens, decoded
    predictions: np.ndarray  # int8: 1 positive, 0 negative, -1 unparsed
    log_odds: np.ndarray  # float64: yes vs no at the first generated step
    padding_fraction: float


class ParityScorer:
    """Generate-and-parse scoring with naive batching; tokenizes on every call, as the paper."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        template: PromptTemplate | None = None,
        max_patient_tokens: int = 512,
        batch_size: int = 8,
        new_tokens: int = 2,
        device=None,
        answer_tokens: AnswerTokens | None = None,
    ):
        import torch

        if batch_size < 1:
            raise FedmergeError(f"batch_size: got {batch_size}; expected >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or PromptTemplate()
        self.max_patient_tokens = max_patient_tokens
        self.batch_size = batch_size
        self.new_tokens = new_tokens
        self.answers = answer_tokens or AnswerTokens.from_tokenizer(tokenizer)
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        if param.device != self.device:
            model.to(self.device)
        model.eval()

    def run(self, records: Sequence, progress: Callable[[int], None] | None = None) -> ParityResult:
        import torch

        if not records:
            raise FedmergeError("records: the dataset is empty; expected at least one stay")
        seqs, _ = encode_records(records, self.tokenizer, self.template, self.max_patient_tokens)
        pad = pad_id_of(self.tokenizer)
        batches = [
            left_pad(rows, [seqs[i] for i in rows], pad)
            for rows in fixed_batches(len(seqs), self.batch_size)
        ]
        yes = list(self.answers.yes_ids)
        no = list(self.answers.no_ids)
        answers: list[str] = [""] * len(seqs)
        log_odds = np.empty(len(seqs), dtype=np.float64)
        with torch.inference_mode(), autocast_for(self.device):
            for batch in batches:
                ids = batch.input_ids.to(self.device)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=batch.attention_mask.to(self.device),
                    max_new_tokens=self.new_tokens,
                    min_new_tokens=self.new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                first = out.logits[0].float()
                lo = torch.logsumexp(first[:, yes], -1) - torch.logsumexp(first[:, no], -1)
                log_odds[list(batch.rows)] = lo.double().cpu().numpy()
                new = out.sequences[:, ids.shape[1]:]
                for row, text in zip(
                    batch.rows, self.tokenizer.batch_decode(new, skip_special_tokens=True),
                    strict=True,
                ):
                    answers[row] = text
                if progress is not None:
                    progress(len(batch.rows))
        return ParityResult(
            stay_ids=tuple(r.stay_id for r in records),
            labels=np.array([r.label for r in records], dtype=np.int8),
            answers=tuple(answers),
            predictions=np.array([parse_answer(a) for a in answers], dtype=np.int8),
            log_odds=log_odds,
            padding_fraction=padding_fraction(batches),
        )

"""Token-budget batches of length-sorted prompts, left padded.

On a CPU, cost is proportional to the padded tokens a batch computes, and any padding also costs
attention its causal fast path. Sorting by length and capping each row's padding makes the
padded tokens nearly equal to the real ones; the token budget (rows × padded length) bounds
memory the same way for short and long prompts. Padding goes on the left so the last position of
every row is the real last token, whose next-token logits are the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Share of a batch's padded tokens that may be padding: each row joins a batch only if it is at
# least this close to the batch's longest row, so the bound holds for every batch.
MAX_PADDING = 0.1


def budget_batches(
    lengths: Sequence[int], batch_tokens: int, max_padding: float = MAX_PADDING
) -> list[list[int]]:
    """Row indices grouped longest first; rows × longest <= batch_tokens, padding <= max_padding.

    A prompt longer than the budget gets a batch of its own rather than being refused.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens: got {batch_tokens}; expected >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        fits = (len(current) + 1) * longest <= batch_tokens
        close = lengths[i] >= (1.0 - max_padding) * longest
        if current and fits and close:
            current.append(i)
            continue
        if current:
            batches.append(current)
        current, longest = [i], lengths[i]
    if current:
        batches.append(current)
    return batches


def fixed_batches(n: int, rows: int) -> list[list[int]]:
    """Naive batching, the paper-parity baseline: dataset order, `rows` at a time."""
    if rows < 1:
        raise ValueError(f"rows: got {rows}; expected >= 1")
    return [list(range(s, min(s + rows, n))) for s in range(0, n, rows)]


@dataclass(frozen=True)
class PaddedBatch:
    """One batch ready for the model: `rows` are the dataset indices of its rows, in order."""

    rows: tuple[int, ...]
    input_ids: object  # torch.LongTensor [rows, padded length]
    attention_mask: object  # torch.LongTensor, 0 on the left padding
    position_ids: object  # torch.LongTensor, counted from each row's first real token

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def left_pad(rows: Sequence[int], seqs: Sequence[Sequence[int]], pad_id: int) -> PaddedBatch:
    """Left-pad `seqs` to their longest; position ids from the mask, as if each were alone.

    RoPE is shift-invariant, but other position schemes are not, and generation also uses
    mask-derived positions: this keeps a padded row's logits equal to its unpadded ones.
    """
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(tuple(rows), ids, mask, positions)


def padding_fraction(batches: Sequence[PaddedBatch]) -> float:
    """Share of computed tokens that are padding."""
    padded = sum(b.padded_tokens for b in batches)
    return 0.0 if padded == 0 else 1.0 - sum(b.real_tokens for b in batches) / padded

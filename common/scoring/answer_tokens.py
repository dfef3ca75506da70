"""Which vocabulary entries count as "yes" and which as "no".

Tokenizers disagree on answers: byte-level BPE has distinct ids for "yes" and " yes", some split
"no" into two pieces, and looking up an unknown token silently returns the unk id. Scoring a
wrong or merged id gives plausible-looking but meaningless probabilities, so the sets are decided
explicitly: every spacing and case variant that encodes to exactly one real token is kept, and
anything else is refused loudly.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from common.errors import FedmergeError

YES_WORDS = ("yes", "Yes", "YES")
NO_WORDS = ("no", "No", "NO")


class AnswerTokens(BaseModel):
    """Disjoint, non-empty sets of single-token ids for a positive and a negative answer."""

    model_config = ConfigDict(frozen=True)

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]

    @model_validator(mode="after")
    def _disjoint(self) -> AnswerTokens:
        if not self.yes_ids or not self.no_ids:
            raise ValueError("answer tokens: yes_ids and no_ids must both be non-empty")
        both = set(self.yes_ids) & set(self.no_ids)
        if both:
            raise ValueError(f"answer tokens: ids {sorted(both)} are in both the yes and no sets")
        return self

    @property
    def ids(self) -> tuple[int, ...]:
        """Yes ids then no ids: the rows of the output projection the scorer needs."""
        return self.yes_ids + self.no_ids

    @classmethod
    def from_tokenizer(
        cls, tokenizer, yes_words=YES_WORDS, no_words=NO_WORDS
    ) -> AnswerTokens:
        """Every variant (bare and with a leading space) of the words that is one known token."""
        yes = _single_tokens(tokenizer, yes_words, "yes")
        no = _single_tokens(tokenizer, no_words, "no")
        return cls.from_ids(tokenizer, yes, no)

    @classmethod
    def from_ids(cls, tokenizer, yes_ids, no_ids) -> AnswerTokens:
        """Explicit ids, checked against the tokenizer: in range, not unk, not special."""
        size = len(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        for name, ids in (("yes_ids", yes_ids), ("no_ids", no_ids)):
            for i in ids:
                if not isinstance(i, int) or not 0 <= i < size:
                    raise FedmergeError(
                        f"answer tokens: {name} has {i!r}; expected an id in [0, {size})"
                    )
                if i == unk or i in special:
                    raise FedmergeError(
                        f"answer tokens: {name} has {i} ({tokenizer.convert_ids_to_tokens(i)!r}), "
                        "a special or unknown token; expected a real answer word"
                    )
        yes, no = tuple(dict.fromkeys(yes_ids)), tuple(dict.fromkeys(no_ids))
        if not yes or not no:
            raise FedmergeError("answer tokens: yes_ids and no_ids must both be non-empty")
        if set(yes) & set(no):
            raise FedmergeError(
                f"answer tokens: ids {sorted(set(yes) & set(no))} are in both the yes and no sets"
            )
        return cls(yes_ids=yes, no_ids=no)


def _single_tokens(tokenizer, words, kind: str) -> list[int]:
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    found: list[int] = []
    for word in words:
        for variant in (word, " " + word):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == unk or ids[0] in special:
                continue
            # A single token that does not spell the word (a lossy normaliser) is not an answer.
            if tokenizer.decode(ids).strip() != word:
                continue
            if ids[0] not in found:
                found.append(ids[0])
    if not found:
        raise FedmergeError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: none of {list(words)} (with or "
            f"without a leading space) is a single known token; expected at least one {kind} token"
        )
    return found

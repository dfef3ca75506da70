"""The prompt a model answers, and its tokenization with a budget on the patient text only.

Patient texts can be far longer than a model's context, but the instruction and the question at
the end are what make the next token a yes/no answer: cutting them (as tokenizer-level
truncation does) would silently score something else. So the full prompt is tokenized once,
tokens are assigned to prefix, patient text or suffix by their character offsets, and only the
patient part is cut. Tokenizing the whole string (rather than the pieces) keeps the ids identical
to what the model would see for an untruncated prompt, even for BPE merges at the seams.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from common.errors import FedmergeError

PLACEHOLDER = "{patient_data}"

# PatientDx's wording (Moreno et al. 2025), paraphrased in the paper; the question is repeated
# after the data so that it is the last thing the model reads before answering.
DEFAULT_TEMPLATE = (
    "You are a very helpful healthcare assistant. Answer only yes or no. "
    "Given the patient's hospital profile below, did the patient die during the ICU stay?\n"
    f"{PLACEHOLDER}\n"
    "Did the patient die during the ICU stay? Answer (yes or no):"
)

# Stands in for the patient text while a chat template is rendered, then is split on.
_SENTINEL = "\u2063FEDMERGE_PATIENT_DATA\u2063"


class PromptTemplate(BaseModel):
    """A prompt with one `{patient_data}` slot, optionally in the tokenizer's chat template."""

    model_config = ConfigDict(frozen=True)

    template: str = DEFAULT_TEMPLATE
    use_chat_template: bool = False

    @field_validator("template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"prompt template: found {value.count(PLACEHOLDER)} '{PLACEHOLDER}'; "
                "expected exactly one"
            )
        return value

    def render(self, tokenizer, patient_text: str) -> tuple[str, int, int]:
        """The full prompt text and the character span [start, end) of the patient text in it."""
        if self.use_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise FedmergeError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: chat_template is "
                    "missing; expected one for --chat-template (or score without it)"
                )
            content = self.template.replace(PLACEHOLDER, _SENTINEL)
            shell = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            if shell.count(_SENTINEL) != 1:
                raise FedmergeError(
                    f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: chat_template did not "
                    "keep the user message intact; expected the patient text to appear once"
                )
            prefix, suffix = shell.split(_SENTINEL)
        else:
            prefix, suffix = self.template.split(PLACEHOLDER)
        return prefix + patient_text + suffix, len(prefix), len(prefix) + len(patient_text)

    def encode(
        self, tokenizer, patient_text: str, max_patient_tokens: int
    ) -> tuple[list[int], bool]:
        """Token ids of the prompt with at most `max_patient_tokens` of patient text (head kept).

        Returns the ids and whether the patient text was cut. The chat template carries its own
        special tokens (BOS included, if the model uses one), so the tokenizer adds none then.
        """
        if max_patient_tokens < 0:
            raise FedmergeError(f"max_patient_tokens: got {max_patient_tokens}; expected >= 0")
        text, start, end = self.render(tokenizer, patient_text)
        enc = tokenizer(
            text,
            add_special_tokens=not self.use_chat_template,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        head: list[int] = []
        patient: list[int] = []
        tail: list[int] = []
        for tid, (lo, hi), special in zip(
            enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True
        ):
            # Tokens the tokenizer added have no text. Leading ones (BOS) stay in front; a trailing
            # one (an EOS some tokenizers append) is dropped: the answer must follow the question.
            if special and hi == lo:
                if not patient and not tail:
                    head.append(tid)
            elif lo < start:
                head.append(tid)
            elif lo < end:
                patient.append(tid)
            else:
                tail.append(tid)
        cut = len(patient) > max_patient_tokens
        return head + patient[:max_patient_tokens] + tail, cut

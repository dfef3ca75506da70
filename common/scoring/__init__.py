"""Yes/no scoring of patient prompts; torch is imported only when a model is actually run."""

from common.scoring.answer_tokens import AnswerTokens
from common.scoring.parity import ParityResult, ParityScorer, parse_answer
from common.scoring.prompt import DEFAULT_TEMPLATE, PromptTemplate
from common.scoring.scorer import PreparedDataset, YesNoScorer, p_yes

__all__ = [
    "DEFAULT_TEMPLATE",
    "AnswerTokens",
    "ParityResult",
    "ParityScorer",
    "PreparedDataset",
    "PromptTemplate",
    "YesNoScorer",
    "p_yes",
    "parse_answer",
]

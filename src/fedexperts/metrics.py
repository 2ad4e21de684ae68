"""Text scores of a generated answer against its reference, computed as the papers do (torch-free).

- **ROUGE-1, ROUGE-2, ROUGE-L**: F-measures from Google's ``rouge-score`` package (the one FLEx's
  evaluation uses), with its Porter stemmer on by default (``use_stemmer=True``: ``runs`` and
  ``running`` match). The ``default`` tokenizer is rouge-score's own: lowercased, every run of
  characters other than ``a-z0-9`` a separator, so text in non-Latin scripts has no tokens and
  scores 0.0 even against itself. For such text pick ``characters`` (every non-space character a
  token, the usual choice for Chinese or Japanese) or ``whitespace`` (every whitespace-separated
  run a token, for scripts that put spaces between words); both apply Unicode NFKC and casefold
  first, and ``whitespace`` stems like the default when stemming is on (only words of more than
  three characters, as rouge-score does).
- **Exact match** and **token F1** as in SQuAD's evaluation script: both texts normalised by
  :func:`normalize_answer` (lowercase, ASCII punctuation removed, the articles ``a``/``an``/``the``
  removed, whitespace runs made one space); exact match compares the normalised strings, token F1
  is the F1 of the two bags of whitespace tokens (two empty answers score 1.0, one empty 0.0, as
  in SQuAD 2.0).
- **Label accuracy**: the normalised first line of the prediction (after leading whitespace)
  equals the normalised label, so a classifier that goes on writing after its label still counts.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

from nltk.stem import porter
from rouge_score import rouge_scorer, tokenizers

RougeTokenizer = Literal["default", "characters", "whitespace"]
"""How ROUGE splits text into tokens; see the module docstring."""
ROUGE_TOKENIZERS: tuple[RougeTokenizer, ...] = get_args(RougeTokenizer)

_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop ASCII punctuation, drop articles, collapse whitespace."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> bool:
    """SQuAD exact match: the two texts are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the shared normalised tokens (a bag)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def first_line(text: str) -> str:
    """The first line of ``text`` once leading whitespace (blank lines included) is dropped."""
    return text.lstrip().split("\n", 1)[0]


def label_match(prediction: str, label: str) -> bool:
    """Label accuracy for one example: the prediction's normalised first line is the normalised label."""
    return normalize_answer(first_line(prediction)) == normalize_answer(label)


class CharacterTokenizer(tokenizers.Tokenizer):
    """Every non-space character a token (NFKC, casefolded): ROUGE for text written without spaces."""

    def tokenize(self, text: str) -> list[str]:
        return [char for char in unicodedata.normalize("NFKC", text).casefold() if not char.isspace()]


class WhitespaceTokenizer(tokenizers.Tokenizer):
    """Every whitespace-separated run a token (NFKC, casefolded), Porter-stemmed like the default if asked."""

    def __init__(self, use_stemmer: bool = False) -> None:
        self._stemmer = porter.PorterStemmer() if use_stemmer else None

    def tokenize(self, text: str) -> list[str]:
        words = unicodedata.normalize("NFKC", text).casefold().split()
        if self._stemmer is None:
            return words
        return [self._stemmer.stem(word) if len(word) > 3 else word for word in words]


@cache
def rouge(stemmer: bool = True, tokenizer: RougeTokenizer = "default") -> rouge_scorer.RougeScorer:
    """The ROUGE-1/2/L scorer for these options (built once per combination)."""
    custom: tokenizers.Tokenizer | None
    if tokenizer == "default":
        custom = None
    elif tokenizer == "characters":
        custom = CharacterTokenizer()
    elif tokenizer == "whitespace":
        custom = WhitespaceTokenizer(use_stemmer=stemmer)
    else:
        raise ValueError(f"unknown ROUGE tokenizer {tokenizer!r}; expected one of {', '.join(ROUGE_TOKENIZERS)}")
    return rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=stemmer, tokenizer=custom)


@dataclass(frozen=True)
class RougeScores:
    """F-measures of one prediction against its reference."""

    rouge_1: float
    rouge_2: float
    rouge_l: float


def rouge_scores(
    prediction: str, reference: str, *, stemmer: bool = True, tokenizer: RougeTokenizer = "default"
) -> RougeScores:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures of ``prediction`` against ``reference``."""
    scores = rouge(stemmer, tokenizer).score(reference, prediction)
    return RougeScores(
        rouge_1=float(scores["rouge1"].fmeasure),
        rouge_2=float(scores["rouge2"].fmeasure),
        rouge_l=float(scores["rougeL"].fmeasure),
    )


@dataclass(frozen=True)
class TextScores:
    """Means over examples of every text score (the ``Scores`` fields a generation pass fills)."""

    exact_match: float
    rouge_l: float
    rouge_1: float
    rouge_2: float
    token_f1: float
    accuracy: float


def text_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    stemmer: bool = True,
    tokenizer: RougeTokenizer = "default",
) -> TextScores:
    """Every text score, each the unweighted mean over the (prediction, reference) pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    count = len(predictions)
    pairs = list(zip(predictions, references, strict=True))
    rouges = [rouge_scores(p, r, stemmer=stemmer, tokenizer=tokenizer) for p, r in pairs]
    return TextScores(
        exact_match=sum(exact_match(p, r) for p, r in pairs) / count,
        rouge_l=sum(score.rouge_l for score in rouges) / count,
        rouge_1=sum(score.rouge_1 for score in rouges) / count,
        rouge_2=sum(score.rouge_2 for score in rouges) / count,
        token_f1=sum(token_f1(p, r) for p, r in pairs) / count,
        accuracy=sum(label_match(p, r) for p, r in pairs) / count,
    )

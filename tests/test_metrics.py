from typing import get_args

import pytest

from fedexperts.config import EvalConfig, load_config
from fedexperts.metrics import (
    ROUGE_TOKENIZERS,
    CharacterTokenizer,
    WhitespaceTokenizer,
    exact_match,
    label_match,
    normalize_answer,
    rouge_scores,
    text_scores,
    token_f1,
)

STEMMED_PAIR = ("the dog runs quick", "The dogs were running quickly")


def test_rouge_stems_by_default_as_rouge_score_does():
    stemmed = rouge_scores(*STEMMED_PAIR)
    assert stemmed.rouge_l == pytest.approx(2 / 3, abs=1e-3)
    assert stemmed.rouge_1 == pytest.approx(2 / 3, abs=1e-3)
    assert stemmed.rouge_2 == pytest.approx(2 / 7, abs=1e-3)  # "dog run" is the one shared bigram
    plain = rouge_scores(*STEMMED_PAIR, stemmer=False)
    assert plain.rouge_l == pytest.approx(2 / 9, abs=1e-3)
    assert plain.rouge_2 == 0.0


def test_default_tokenizer_drops_non_latin_text_and_characters_keep_it():
    text = "我们今天去市场买了苹果"
    assert rouge_scores(text, text).rouge_l == 0.0
    same = rouge_scores(text, text, tokenizer="characters")
    assert (same.rouge_1, same.rouge_2, same.rouge_l) == (1.0, 1.0, 1.0)
    assert rouge_scores("我们去市场", "我们今天去市场", tokenizer="characters").rouge_l == pytest.approx(10 / 12)


def test_character_and_whitespace_tokenizers():
    assert CharacterTokenizer().tokenize("日本 語ＡＢ") == ["日", "本", "語", "a", "b"]
    assert WhitespaceTokenizer().tokenize("Привет  мир\nRunning") == ["привет", "мир", "running"]
    assert WhitespaceTokenizer(use_stemmer=True).tokenize("Привет Running") == ["привет", "run"]
    words = "Привет мир"
    assert rouge_scores(words, words, tokenizer="whitespace").rouge_l == 1.0
    assert rouge_scores("мир", words, tokenizer="whitespace").rouge_l == pytest.approx(2 / 3)


def test_unknown_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="unknown ROUGE tokenizer 'words'"):
        rouge_scores("a", "a", tokenizer="words")  # type: ignore[arg-type]


def test_squad_normalisation():
    assert normalize_answer("  The Answer:\n is  an apple, (a red one).") == "answer is apple red one"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match("The Salt.", "salt")
    assert exact_match("Salt", "salt")
    assert not exact_match("sea salt", "salt")


def test_token_f1_is_squads():
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("salt salt", "salt") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # a bag: counts matter
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty once normalised
    assert token_f1("", "cat") == 0.0


def test_label_match_reads_the_first_line():
    assert label_match("\n Positive.\nBecause the review says so.", "positive")
    assert not label_match("The label is positive", "positive")
    assert not label_match("", "positive")


def test_text_scores_are_means_over_pairs():
    scores = text_scores(["Salt", "dog"], ["salt", "the cat"])
    assert scores.exact_match == 0.5 and scores.accuracy == 0.5
    assert scores.token_f1 == 0.5 and scores.rouge_l == 0.5
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        text_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        text_scores([], [])


def test_config_rouge_options_match_the_metrics_module():
    assert get_args(EvalConfig.model_fields["rouge_tokenizer"].annotation) == ROUGE_TOKENIZERS
    config = load_config(None, ["eval.rouge_tokenizer=characters", "eval.rouge_stemmer=false"])
    assert config.eval.rouge_tokenizer == "characters" and config.eval.rouge_stemmer is False
    assert EvalConfig().rouge_stemmer is True and EvalConfig().rouge_tokenizer == "default"

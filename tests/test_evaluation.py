from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fedexperts import evaluation
from fedexperts.data.expertbench import ExpertBench
from fedexperts.data.mmlu import MMLUQuestion
from fedexperts.evaluation import (
    EvalSet,
    RoutingProfile,
    Scores,
    continuation_log_likelihoods,
    exact_match,
    generate,
    instruction_scores,
    mmlu_scores,
    multiple_choice_accuracy,
    rouge_l,
    routing_profile,
)
from fedexperts.models.builtin import RECIPES, build_tokenizer
from fedexperts.models.tiny import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ExpertBench.from_seed(0), RECIPES["micro"])


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("olmoe", seed=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def test_exact_match_is_squads():
    assert exact_match(" salt\n", "salt")
    assert exact_match("Salt", "salt")
    assert exact_match("The salt.", "salt")
    assert not exact_match("sea salt", "salt")


def test_rouge_l_is_the_lcs_f_measure():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat sat") == 0.0
    # LCS 2: precision 2/2, recall 2/3 -> F 0.8
    assert rouge_l("the cat", "the cat sat") == pytest.approx(0.8)


def test_rouge_l_stems_and_takes_a_tokenizer():
    assert rouge_l("the dog runs quick", "The dogs were running quickly") == pytest.approx(0.667, abs=1e-3)
    assert rouge_l("the dog runs quick", "The dogs were running quickly", stemmer=False) == pytest.approx(
        0.222, abs=1e-3
    )
    assert rouge_l("北京欢迎你", "北京欢迎你") == 0.0
    assert rouge_l("北京欢迎你", "北京欢迎你", tokenizer="characters") == 1.0


def test_instruction_scores_fill_every_score(monkeypatch, model):
    data = EvalSet(prompts=("q1", "q2"), references=("The dogs were running quickly", "北京"), rows=({}, {}))
    monkeypatch.setattr(evaluation, "token_loss", lambda *args, **kwargs: 1.5)
    monkeypatch.setattr(evaluation, "generate", lambda *args, **kwargs: ["the dog runs quick", "北京"])
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    scores = instruction_scores(model, tokenizer, data)
    assert scores.loss == 1.5 and scores.examples == 2
    assert scores.rouge_l == pytest.approx(0.667 / 2, abs=1e-3)  # the Chinese pair has no default tokens
    assert scores.exact_match == 0.5 and scores.accuracy == 0.5  # "北京" matches itself
    assert scores.token_f1 == 0.5  # SQuAD F1 does not stem: "dog" is not "dogs"
    assert scores.rouge_1 is not None and scores.rouge_2 is not None
    characters = instruction_scores(model, tokenizer, data, rouge_tokenizer="characters", rouge_stemmer=False)
    assert characters.rouge_l > scores.rouge_l
    assert set(scores.as_dict()) == set(Scores.model_fields)


def greedy_by_hand(model, tokenizer, prompt, steps):
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generation_is_greedy_capped_and_ignores_left_padding(model, tokenizer):
    prompts = ["Question: Where does Maren live?\nAnswer:", "Hi", "Question: What does Varo export?"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert batched == [greedy_by_hand(model, tokenizer, prompt, 6) for prompt in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == batched
    shorter = generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=3)
    assert shorter == [greedy_by_hand(model, tokenizer, prompt, 2) for prompt in prompts]
    assert shorter != batched


def test_continuation_log_likelihood_matches_a_direct_computation(model, tokenizer):
    prompt, continuation = "Question: What does Varo export?\nAnswer:", " salt"
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(continuation)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
    expected = sum(float(log_probs[position - 1, ids[position]]) for position in range(len(prompt_ids), len(ids)))
    pairs = [(prompt, continuation), ("Hi", " there friend"), (prompt, " iron")]
    scores = continuation_log_likelihoods(model, tokenizer, pairs, batch_size=3)
    assert scores[0] == pytest.approx(expected, abs=1e-4)
    assert continuation_log_likelihoods(model, tokenizer, pairs, batch_size=1) == pytest.approx(scores, abs=1e-4)


class FavouriteToken(nn.Module):
    """Predicts the same distribution everywhere: one token is far more likely than the rest."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 10.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


@dataclass
class Question:
    prompt: str
    choices: tuple[str, ...]
    answer_index: int


def test_multiple_choice_picks_the_most_likely_choice(tokenizer):
    words = sorted(token for token in tokenizer.get_vocab() if token.startswith("Ġ") and token[1:].isalpha())[:3]
    first, favourite, third = (tokenizer.convert_tokens_to_string([word]) for word in words)
    model = FavouriteToken(len(tokenizer), tokenizer.convert_tokens_to_ids(words[1]))
    right = [Question("Question: x?\nAnswer:", (first, favourite, third), 1)]
    wrong = [Question("Question: x?\nAnswer:", (favourite, first, third), 2)]
    assert multiple_choice_accuracy(model, tokenizer, right + right) == 1.0
    assert multiple_choice_accuracy(model, tokenizer, right + wrong) == 0.5


def test_mmlu_scores_per_subject_and_overall(monkeypatch, model, tokenizer):
    questions = [
        MMLUQuestion("anatomy", "Which bone is in the arm?", ("Femur", "Tibia", "Fibula", "Humerus"), 3),
        MMLUQuestion("anatomy", "Where is the patella?", ("Knee", "Elbow", "Hip", "Wrist"), 0),
        MMLUQuestion("virology", "What does a virus need?", ("Nothing", "A host", "Light", "Salt"), 1),
    ]
    model.train()
    measured = mmlu_scores(model, tokenizer, questions, batch_size=5)  # the tiny random model, really scored
    assert model.training  # put back as it was
    assert set(measured.subjects) == {"anatomy", "virology"}
    assert measured.overall in (0.0, 1 / 3, 2 / 3, 1.0)
    assert measured.subjects["anatomy"] in (0.0, 0.5, 1.0) and measured.subjects["virology"] in (0.0, 1.0)
    assert measured.overall == pytest.approx((measured.subjects["anatomy"] * 2 + measured.subjects["virology"]) / 3)

    letters = {question.prompt: question.choices[question.answer_index] for question in questions}

    def prefers(model, tokenizer, pairs, **kwargs):  # the right letter is the likeliest continuation
        return [0.0 if letters[prompt] == letter else -5.0 for prompt, letter in pairs]

    monkeypatch.setattr(evaluation, "continuation_log_likelihoods", prefers)
    forced = mmlu_scores(model, tokenizer, questions)
    assert forced.overall == 1.0 and forced.subjects == {"anatomy": 1.0, "virology": 1.0}
    letters[questions[0].prompt] = " A"  # now the model picks A where D is right
    one_wrong = mmlu_scores(model, tokenizer, questions)
    assert one_wrong.subjects == {"anatomy": 0.5, "virology": 1.0}
    assert one_wrong.overall == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no questions"):
        mmlu_scores(model, tokenizer, [])


def test_routing_profile_counts_every_real_token(model):
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}
    other = {"input_ids": torch.randint(100, 300, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    profile = routing_profile(model, {"first": [batch], "again": [batch], "other": [other]})
    top_k = model.config.num_experts_per_tok
    assert profile.counts.shape == (3, model.config.num_hidden_layers, model.config.num_experts)
    assert profile.counts[0].sum(dim=-1).tolist() == [10 * top_k] * model.config.num_hidden_layers
    assert torch.equal(profile.counts[0], profile.counts[1])
    assert profile.total_variation("first", "again") == 0.0
    assert profile.divergence()["first"] >= 0.0
    merged = profile.merged({"both": ["first", "again"], "other": ["other"]})
    assert torch.equal(merged.counts[0], 2 * profile.counts[0])


def test_entropy_and_divergence_of_known_distributions():
    counts = torch.tensor([[[1, 1, 1, 1]], [[4, 0, 0, 0]], [[0, 0, 0, 4]]])
    profile = RoutingProfile(("uniform", "first", "last"), ("layer",), counts)
    assert profile.entropy() == pytest.approx({"uniform": 2.0, "first": 0.0, "last": 0.0})
    assert profile.total_variation("first", "last") == pytest.approx(1.0)
    assert profile.total_variation("uniform", "first") == pytest.approx(0.75)
    divergence = profile.divergence()
    assert divergence["first"] == pytest.approx(divergence["last"])
    assert divergence["first"] > divergence["uniform"] > 0

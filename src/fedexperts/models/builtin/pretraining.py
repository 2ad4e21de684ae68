"""Pretraining the built-in model: tokenizer, fresh OLMoE, packed ExpertBench corpus, training loop.

No model can be downloaded here, so fedexperts makes its own: a byte-level BPE tokenizer trained with
``tokenizers`` on ExpertBench text, and a stock transformers OLMoE (8 experts per layer, top-2) pretrained on
ExpertBench's corpus. :func:`pretrain` runs the whole recipe and saves a plain Hugging Face folder
(``AutoModelForCausalLM`` / ``AutoTokenizer`` load it) with its model card, atomically. A Switch recipe
(:attr:`Recipe.architecture`) makes an encoder-decoder Switch Transformer instead (``AutoModelForSeq2SeqLM``),
pretrained by prefix language modelling on the documents and on the tasks' prompt -> completion pairs.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from fedexperts.atomic import atomic_directory
from fedexperts.data.expertbench import CANONICAL, ExpertBench, tokenizer_texts
from fedexperts.data.layout import SEQ2SEQ
from fedexperts.data.templates import prompt_template
from fedexperts.data.tokenize import InstructionCollator
from fedexperts.models.builtin.card import measure, model_card
from fedexperts.models.builtin.recipe import (
    METRICS_FILE,
    RECIPE_FILE,
    ROUTING_PLOT,
    Recipe,
    model_path,
    recipe_record,
    resolve_recipe,
)
from fedexperts.training import cosine_learning_rate

PAD, EOS, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + " {{ message['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
"""User turns, then the answer after one space: byte-level BPE gives ``Maren`` and `` Maren`` different
tokens, and in running text (contexts, facts) a word comes after a space, so answers do too and the
model can copy and recall the very tokens it read."""


# -- tokenizer and model -----------------------------------------------------------------------------


def build_tokenizer(bench: ExpertBench, recipe: Recipe) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on ExpertBench text, with pad/eos/chat markers and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=[PAD, EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_texts(bench.world, seed=recipe.seed), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=recipe.seq_len,
    )


def build_model(recipe: Recipe, tokenizer: Any) -> transformers.PreTrainedModel:
    """A freshly initialised OLMoE, or Switch Transformer (:attr:`Recipe.architecture`), of the recipe's size."""
    if recipe.architecture == "switch_transformers":
        return _build_switch(recipe, tokenizer)
    config = transformers.AutoConfig.for_model(
        "olmoe",
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.expert_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.top_k,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        experts_implementation="eager",
    )
    torch.manual_seed(recipe.seed)
    model: transformers.PreTrainedModel = transformers.AutoModelForCausalLM.from_config(config)
    return model


def _build_switch(recipe: Recipe, tokenizer: Any) -> transformers.PreTrainedModel:
    """A Switch Transformer: ``num_layers`` encoder and decoder blocks, every second one sparse (as in
    Switch-base), experts as wide as the dense MLPs (``expert_size``), the decoder started by padding."""
    config = transformers.AutoConfig.for_model(
        "switch_transformers",
        vocab_size=len(tokenizer),
        d_model=recipe.hidden_size,
        d_kv=recipe.hidden_size // recipe.num_heads,
        d_ff=recipe.expert_size,
        num_layers=recipe.num_layers,
        num_decoder_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        num_experts=recipe.num_experts,
        expert_capacity=recipe.expert_capacity,
        encoder_sparse_step=2,
        decoder_sparse_step=2,
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model: transformers.PreTrainedModel = transformers.AutoModelForSeq2SeqLM.from_config(config)
    return model


# -- data ----------------------------------------------------------------------------------------------


def packed_corpus(bench: ExpertBench, tokenizer: Any, recipe: Recipe) -> torch.Tensor:
    """The corpus as (blocks, seq_len) token ids: documents joined by EOS, shuffled, cut into blocks."""
    corpus = bench.corpus(num_documents=recipe.num_documents, task_fraction=recipe.task_fraction, seed=recipe.seed)
    template = prompt_template(tokenizer, "chat")
    documents = [text + tokenizer.eos_token for text in corpus.texts]
    for task in corpus.tasks:
        response = CANONICAL.render(task.answer)
        documents.append(
            template.prompt(tokenizer, task.instruction, task.context)
            + template.completion(tokenizer, task.instruction, task.context, response)
        )
    random.Random(recipe.seed).shuffle(documents)
    stream = [token for row in tokenizer(documents, add_special_tokens=False)["input_ids"] for token in row]
    blocks = len(stream) // recipe.seq_len
    return torch.tensor(stream[: blocks * recipe.seq_len], dtype=torch.long).view(blocks, recipe.seq_len)


Corpus = torch.Tensor | list[dict[str, list[int]]]
"""Packed ``(blocks, seq_len)`` token ids (decoder-only), or token rows of an encoder-decoder."""


def seq2seq_rows(bench: ExpertBench, tokenizer: Any, recipe: Recipe) -> list[dict[str, list[int]]]:
    """The corpus for an encoder-decoder, as token rows (:mod:`fedexperts.data.layout`): the documents,
    joined by EOS and cut into ``seq_len`` blocks, each block's first half for the encoder and its second
    for the decoder (prefix language modelling); every task's prompt for the encoder and its completion
    for the decoder (a task whose completion exceeds ``seq_len`` is left out). Shuffled."""
    corpus = bench.corpus(num_documents=recipe.num_documents, task_fraction=recipe.task_fraction, seed=recipe.seed)
    documents = tokenizer([text + tokenizer.eos_token for text in corpus.texts], add_special_tokens=False)
    stream = [token for row in documents["input_ids"] for token in row]
    half = recipe.seq_len // 2
    rows = [
        {"input_ids": stream[start : start + half], "labels": stream[start + half : start + 2 * half]}
        for start in range(0, len(stream) - 2 * half + 1, 2 * half)
    ]
    template = prompt_template(tokenizer, "chat")
    for task in corpus.tasks:
        response = CANONICAL.render(task.answer)
        prompt = template.prompt(tokenizer, task.instruction, task.context)
        completion = template.completion(tokenizer, task.instruction, task.context, response)
        ids = tokenizer([prompt, completion], add_special_tokens=False)["input_ids"]
        try:
            input_ids, labels, _ = SEQ2SEQ.example(ids[0], ids[1], max_length=recipe.seq_len, min_prompt_tokens=0)
        except ValueError:
            continue
        rows.append({"input_ids": input_ids, "labels": labels})
    random.Random(recipe.seed).shuffle(rows)
    return rows


def _batches(count: int, recipe: Recipe) -> Iterator[torch.Tensor]:
    """``recipe.steps`` batches of indices into ``count`` items: seeded passes over the corpus, reshuffled each pass."""
    generator = torch.Generator().manual_seed(recipe.seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[: recipe.batch_size]
        order = order[recipe.batch_size :]


def _pretraining_loss(model: transformers.PreTrainedModel, corpus: Corpus, chosen: torch.Tensor) -> torch.Tensor:
    """The model's own loss (router terms included) on the chosen blocks, or rows (an encoder-decoder)."""
    if isinstance(corpus, torch.Tensor):
        batch = corpus[chosen]
        return model(input_ids=batch, labels=batch, output_router_logits=True).loss
    rows = InstructionCollator(int(model.config.pad_token_id))([corpus[index] for index in chosen.tolist()])
    return model(**rows, output_router_logits=True).loss


PRETRAINING_FLOOR = 0.1
"""The pretraining learning rate decays to a tenth of its peak."""


@contextmanager
def torch_threads(count: int | None = None) -> Iterator[int]:
    """Use ``count`` threads (default: every core this process may run on), restoring the old count after."""
    previous = torch.get_num_threads()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chosen = count or available
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)


# -- training ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainLog:
    steps: int
    tokens: int
    first_loss: float
    final_loss: float
    """Mean language-model loss (router loss included) over the last tenth of the steps."""
    seconds: float


def train(model: transformers.PreTrainedModel, blocks: Corpus, recipe: Recipe, *, progress: bool) -> TrainLog:
    """Next-token training on packed blocks (or on token rows, :func:`seq2seq_rows`), with the router's
    load-balancing loss (and Switch's router z-loss, which its own loss adds)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(total=recipe.steps, desc="pretraining", unit="step", disable=not progress)
    for step, chosen in enumerate(_batches(len(blocks), recipe)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_learning_rate(
                step,
                peak=recipe.learning_rate,
                floor_fraction=PRETRAINING_FLOOR,
                warmup_steps=recipe.warmup_steps,
                total_steps=recipe.steps,
            )
        loss = _pretraining_loss(model, blocks, chosen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update()
    bar.close()
    model.eval()
    tail = losses[-max(len(losses) // 10, 1) :]
    return TrainLog(
        steps=len(losses),
        tokens=len(losses) * recipe.batch_size * recipe.seq_len,  # an encoder-decoder's rows: at most this
        first_loss=losses[0],
        final_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
    )


# -- the whole recipe ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    metrics: dict[str, Any]


def pretrain(
    recipe: Recipe | str = "default",
    path: str | Path | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
) -> PretrainResult:
    """Build the tokenizer, pretrain, measure, and save the checkpoint with its card (atomically)."""
    from fedexperts.reporting.builtin_plots import plot_routing  # rendering: imported only when a model is saved

    chosen = resolve_recipe(recipe)
    target = Path(path) if path is not None else model_path(chosen)
    started = time.perf_counter()
    with torch_threads(threads) as used_threads:
        bench = ExpertBench.from_seed(chosen.world_seed)
        tokenizer = build_tokenizer(bench, chosen)
        encoder_decoder = chosen.architecture == "switch_transformers"
        blocks: Corpus = (
            seq2seq_rows(bench, tokenizer, chosen) if encoder_decoder else packed_corpus(bench, tokenizer, chosen)
        )
        model = build_model(chosen, tokenizer)
        log = train(model, blocks, chosen, progress=progress)
        measured_at = time.perf_counter()
        metrics = measure(model, tokenizer, bench, chosen)
        metrics.update(
            {
                "train": asdict(log),
                "corpus_blocks": len(blocks),
                "parameters": sum(parameter.numel() for parameter in model.parameters()),
                "vocab_size": len(tokenizer),
                "threads": used_threads,
                "measure_seconds": time.perf_counter() - measured_at,
                "total_seconds": time.perf_counter() - started,
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            }
        )
        with atomic_directory(target) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            plot_routing(metrics, staging / ROUTING_PLOT)
            (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            (staging / "README.md").write_text(model_card(chosen, metrics, bench))
            (staging / RECIPE_FILE).write_text(recipe_record(chosen))
    return PretrainResult(target, metrics)

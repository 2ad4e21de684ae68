"""ExpertBench: a seeded world, Dolly-like tasks with per-client conventions, probes and a corpus.

See ``docs/expertbench.md`` for the design: world knowledge (taught by pretraining, checked by the
probes), shared skills (reading, extracting, classifying, summarising), and personal conventions
(how each client wants answers written).
"""

from fedexperts.data.expertbench.categories import CATEGORIES, TaskItem, generate_items
from fedexperts.data.expertbench.corpus import Corpus, pretraining_corpus, tokenizer_texts
from fedexperts.data.expertbench.generator import (
    ANSWER_COLUMN,
    ExpertBench,
    FederatedBench,
    items_dataset,
    restyle,
)
from fedexperts.data.expertbench.probes import KnowledgeProbe, knowledge_probes, probe_prompt
from fedexperts.data.expertbench.styles import CANONICAL, CONVENTIONS, Answer, Style, client_styles
from fedexperts.data.expertbench.world import GOODS, RELATIONS, Fact, Relation, World, make_world

__all__ = [
    "ANSWER_COLUMN",
    "CANONICAL",
    "CATEGORIES",
    "CONVENTIONS",
    "GOODS",
    "RELATIONS",
    "Answer",
    "Corpus",
    "ExpertBench",
    "Fact",
    "FederatedBench",
    "KnowledgeProbe",
    "Relation",
    "Style",
    "TaskItem",
    "World",
    "client_styles",
    "generate_items",
    "items_dataset",
    "knowledge_probes",
    "make_world",
    "pretraining_corpus",
    "probe_prompt",
    "restyle",
    "tokenizer_texts",
]

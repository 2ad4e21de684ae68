from collections import Counter

from fedexperts.data import PartitionSpec, Scheme
from fedexperts.data.expertbench import (
    ANSWER_COLUMN,
    CATEGORIES,
    ExpertBench,
    client_styles,
    generate_items,
    make_world,
    pretraining_corpus,
    probe_prompt,
    restyle,
)


def test_items_are_deterministic_per_seed_and_balanced():
    world = make_world(0)
    items = generate_items(world, 50, seed=1)
    assert items == generate_items(world, 50, seed=1)
    assert items != generate_items(world, 50, seed=2)
    assert Counter(item.category for item in items) == dict.fromkeys(CATEGORIES, 10)


def test_dataset_has_the_dolly_schema_and_the_answer():
    data = ExpertBench.from_seed(0).dataset(10, seed=0)
    assert data.column_names == ["instruction", "context", "response", "category", ANSWER_COLUMN]
    assert set(data["category"]) == set(CATEGORIES)
    assert all(row["response"] for row in data)


def test_contexts_hold_the_answers_of_reading_tasks():
    items = generate_items(make_world(0), 200, seed=5, categories=("closed_qa", "information_extraction"))
    for item in items:
        for part in item.answer.parts:
            assert part in item.context, (item, part)


def test_contexts_never_contradict_the_world():
    world = make_world(0)
    for item in generate_items(world, 100, seed=7, categories=("summarization",)):
        seller, home = item.answer.parts[:2]
        assert world.value(seller, "home") == home
        assert f"{seller} is a {world.value(seller, 'trade')} from {home}." in item.context


def test_open_questions_and_classifications_answer_from_world_facts():
    world = make_world(0)
    facts = {(fact.question, fact.value) for fact in world.facts}
    for item in generate_items(world, 60, seed=3, categories=("open_qa",)):
        assert (item.instruction, item.answer.parts[0]) in facts


def test_two_clients_get_the_same_instruction_with_different_expected_outputs():
    bench = ExpertBench.from_seed(0)
    federated = bench.federated(400, PartitionSpec(Scheme.IID, num_clients=4, seed=0))
    first, second = federated.partition.clients[0].train, federated.partition.clients[1].train
    by_instruction = {}
    for row in first:
        by_instruction.setdefault((row["instruction"], row["context"]), row["response"])
    conflicts = [
        (key, by_instruction[key], row["response"])
        for row in second
        if (key := (row["instruction"], row["context"])) in by_instruction and by_instruction[key] != row["response"]
    ]
    assert conflicts, "clients 0 and 1 should disagree on some shared instruction"
    (_, response_0, response_1) = conflicts[0]
    assert response_0 != response_1
    # the same content, rendered in each client's own style
    assert federated.styles[0] != federated.styles[1]


def test_every_pair_of_four_clients_disagrees_in_every_category():
    bench = ExpertBench.from_seed(0)
    data = bench.dataset(50, seed=0)
    styles = client_styles(4)
    rendered = [restyle(data, style)["response"] for style in styles]
    for category in CATEGORIES:
        rows = [index for index, name in enumerate(data["category"]) if name == category]
        for a in range(len(styles)):
            for b in range(a + 1, len(styles)):
                assert any(rendered[a][i] != rendered[b][i] for i in rows), (category, a, b)


def test_federated_split_is_deterministic_and_styled_per_client():
    bench = ExpertBench.from_seed(0)
    spec = PartitionSpec(Scheme.DIRICHLET, num_clients=3, alpha=0.3, seed=2)
    first, second = bench.federated(150, spec), bench.federated(150, spec)
    for a, b, style in zip(first.partition.clients, second.partition.clients, first.styles, strict=True):
        assert a.train.to_dict() == b.train.to_dict()
        assert a.test.to_dict() == b.test.to_dict()
        assert restyle(a.train, style)["response"] == a.train["response"]


def test_pretraining_corpus_mixes_world_text_and_tasks():
    world = make_world(0)
    corpus = pretraining_corpus(world, num_documents=300, task_fraction=0.2, seed=0)
    assert len(corpus.tasks) == 60 and len(corpus.texts) == 240
    text = "\n".join(corpus.texts)
    for fact in world.facts:
        said = [fact.statement(i) for i in range(3)] + [f"{probe_prompt(fact.question)} {fact.value}"]
        assert any(sentence in text for sentence in said), fact
    assert sum(text.startswith("Question: ") for text in corpus.texts) == 120
    assert pretraining_corpus(world, num_documents=300, task_fraction=0.2, seed=0) == corpus

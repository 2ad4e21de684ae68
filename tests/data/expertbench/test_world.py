from fedexperts.data.expertbench import GOODS, RELATIONS, knowledge_probes, make_world


def test_world_is_deterministic_per_seed():
    assert make_world(0) == make_world(0)
    assert make_world(0).facts != make_world(1).facts


def test_every_entity_has_each_of_its_facts_once():
    world = make_world(0)
    subjects = {"town": world.towns, "person": world.people, "good": tuple(GOODS)}
    for relation in RELATIONS.values():
        holders = [fact.subject for fact in world.facts if fact.relation == relation.name]
        assert sorted(holders) == sorted(subjects[relation.subject])
    assert len(world.facts) == 4 * len(world.towns) + 3 * len(world.people) + len(GOODS)


def test_names_are_unique_across_kinds():
    world = make_world(3)
    names = [*world.towns, *world.people, *world.rivers, *GOODS]
    assert len(names) == len(set(names))


def test_fact_values_come_from_their_relation_domain():
    world = make_world(0)
    for fact in world.facts:
        assert fact.value in world.values(fact.relation)
        assert world.value(fact.subject, fact.relation) == fact.value


def test_probes_have_one_right_answer_among_four_distinct_choices():
    world = make_world(0)
    probes = knowledge_probes(world, seed=0)
    assert len(probes) == len(world.facts)
    for probe in probes:
        assert len(set(probe.choices)) == 4
        assert probe.choices[probe.answer_index] == " " + probe.fact.value
        assert probe.prompt == f"Question: {probe.fact.question}\nAnswer:"
    positions = {probe.answer_index for probe in probes}
    assert positions == {0, 1, 2, 3}, "the right answer should not sit in a fixed position"
    assert knowledge_probes(world, seed=0) == probes

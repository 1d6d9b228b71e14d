"""The embedded world: determinism, the held-out split, counts, styles, eval sets and config errors."""
import dataclasses
import math
import re

import pytest

from gptlab.config import ConfigError, WorldConfig
from gptlab.data.world import (
    ATTRIBUTES,
    BIO_TEMPLATES,
    MAX_WORDINGS,
    PADDED,
    VALUES,
    answer_matches,
    build_world,
    style_of,
)

SMALL = WorldConfig(n_people=60, bios_per_person=4, n_arithmetic=200)

CFG = WorldConfig()  # the defaults, which params.yaml repeats
N_TRAIN_PEOPLE = CFG.n_people - round(CFG.n_people * CFG.heldout_frac)


@pytest.fixture(scope="module")
def world():
    return build_world(CFG, seed=1337)


def _template_patterns(attribute):
    """One regex per bio template of an attribute, matching a sentence with any name and value."""
    patterns = []
    for template in BIO_TEMPLATES[attribute]:
        escaped = re.escape(template).replace(r"\{name\}", r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+)")
        patterns.append(re.compile(escaped.replace(r"\{value\}", r"(?P<value>\w+)")))
    return patterns


def _templates_used(docs, name, attribute):
    """Indices of the templates that state `attribute` of `name` anywhere in docs."""
    used = set()
    for doc in (d for d in docs if name in d):
        for i, pattern in enumerate(_template_patterns(attribute)):
            if any(m.group("name") == name for m in pattern.finditer(doc)):
                used.add(i)
    return used


def test_same_seed_same_world_and_repeat_calls_equal():
    a, b = build_world(SMALL, 7), build_world(SMALL, 7)
    assert a.pretrain_docs("train") == b.pretrain_docs("train")
    assert a.corpus_nats("val") == b.corpus_nats("val")
    assert a.sft_examples("train") == b.sft_examples("train")
    assert a.preference_pairs("heldout") == b.preference_pairs("heldout")
    assert a.mc_items() == b.mc_items()
    assert a.pretrain_docs("val") == a.pretrain_docs("val")
    # callers may mutate what they get without changing the world
    a.sft_examples("train")[0]["answer"] = "mutated"
    assert a.sft_examples("train") == b.sft_examples("train")


def test_different_seeds_differ():
    a, b = build_world(SMALL, 1), build_world(SMALL, 2)
    assert a.pretrain_docs("train") != b.pretrain_docs("train")
    assert a.sft_examples("heldout") != b.sft_examples("heldout")


def test_heldout_people_only_in_pretraining(world):
    heldout = {e["person"] for e in world.sft_examples("heldout")}
    assert len(heldout) == world.summary()["n_heldout_people"] == round(CFG.n_people * CFG.heldout_frac)
    train = world.sft_examples("train")
    train_text = " ".join(e["question"] + e["response"] for e in train)
    assert not any(name in train_text for name in heldout)
    assert not heldout & {p["person"] for p in world.preference_pairs("train")}
    docs = world.pretrain_docs("train")
    for name in sorted(heldout)[:10]:
        assert sum(name in d for d in docs) >= WorldConfig().bios_per_person
        for attribute in ATTRIBUTES:
            assert len(_templates_used(docs, name, attribute)) >= 2, (name, attribute)


def test_heldout_questions_one_per_person_attribute(world):
    heldout = world.sft_examples("heldout")
    keys = [(e["person"], e["attribute"]) for e in heldout]
    assert len(keys) == len(set(keys)) == round(CFG.n_people * CFG.heldout_frac) * len(ATTRIBUTES)
    assert all(e["response"] == f" {e['answer']}." for e in heldout)


def test_single_wording_uses_one_template_per_attribute():
    one = build_world(dataclasses.replace(SMALL, wordings=1), 3)
    docs = one.pretrain_docs("train")
    for name, _ in one.people[:10]:
        for attribute in ATTRIBUTES:
            assert _templates_used(docs, name, attribute) == {0}


def test_biographies_state_the_true_facts(world):
    name, values = world.people[0]
    bios = [d for d in world.pretrain_docs("train") if d.startswith(name) or f" {name}" in d]
    assert bios
    for attribute in ATTRIBUTES:
        for doc in bios:
            found = [m.group("value") for p in _template_patterns(attribute) for m in p.finditer(doc) if m.group("name") == name]
            assert found == [values[attribute]], (attribute, doc)


def test_counts_with_defaults(world):
    s = world.summary()
    assert s["n_entities"] >= 300
    assert s["n_facts"] >= 1000
    assert s["n_train_docs"] == (CFG.n_people + 24) * CFG.bios_per_person + CFG.n_arithmetic
    assert s["n_sft_train"] == N_TRAIN_PEOPLE * len(ATTRIBUTES) * 3 + 500
    assert s["n_mc_items"] == CFG.n_people * len(ATTRIBUTES)


def test_preferred_frac_respected(world):
    train = world.sft_examples("train")
    share = sum(e["style"] == "preferred" for e in train) / len(train)
    assert abs(share - CFG.preferred_frac) < 0.04
    assert all(style_of(e["response"]) == e["style"] for e in train)
    arithmetic = [e for e in train if e["attribute"] == "arithmetic"]
    assert len(arithmetic) == 500 and all(e["person"] == "" for e in arithmetic)
    all_terse = build_world(dataclasses.replace(SMALL, preferred_frac=1.0), 0).sft_examples("train")
    assert all(e["style"] == "preferred" for e in all_terse)


def test_style_of():
    assert style_of(" Lisbon.") == "preferred"
    assert style_of(" 17.") == "preferred"
    assert style_of(PADDED.format(value="Lisbon")) == "dispreferred"
    assert style_of(" I don't know.") == "other"
    assert style_of(" Lisbon, I think.") == "other"
    assert style_of(PADDED.format(value="Lisbon") + " Also Paris.") == "other"
    assert style_of("") == "other"


def test_answer_matches():
    cities = VALUES["city"]
    assert answer_matches(" Lisbon.", "Lisbon", cities)
    assert answer_matches(PADDED.format(value="Lisbon"), "Lisbon", cities)
    assert not answer_matches(" Paris.", "Lisbon", cities)
    assert not answer_matches(" Lisbon or Paris.", "Lisbon", cities)
    assert not answer_matches(" I am not sure.", "Lisbon", cities)
    assert not answer_matches(" Lisbonia.", "Lisbon", cities)
    numbers = [str(n) for n in range(41)]
    assert answer_matches(" 7.", "7", numbers) and not answer_matches(" 17.", "7", numbers)


def test_padded_template_and_names_name_no_value():
    every_value = [v for values in VALUES.values() for v in values]
    assert not any(answer_matches(PADDED.format(value=""), v, []) for v in every_value)
    words = {w.lower() for name, _ in build_world(SMALL, 0).people for w in name.split()}
    assert not words & {v.lower() for v in every_value}


def test_preference_pairs(world):
    pairs = world.preference_pairs("train")
    assert len(pairs) == N_TRAIN_PEOPLE * len(ATTRIBUTES)
    for p in pairs:
        assert p["chosen"] == f" {p['answer']}."
        candidates = world.candidates(p["attribute"])
        if p["kind"] == "style":
            assert p["rejected"] == PADDED.format(value=p["answer"])
        else:
            assert p["kind"] == "fact" and style_of(p["rejected"]) == "preferred"
            assert not answer_matches(p["rejected"], p["answer"], candidates)
            assert p["rejected"].strip(" .") in candidates
    fact_share = sum(p["kind"] == "fact" for p in pairs) / len(pairs)
    assert abs(fact_share - 1 / 3) < 0.05
    heldout = world.preference_pairs("heldout")
    assert {p["person"] for p in heldout} == {e["person"] for e in world.sft_examples("heldout")}


def test_mc_items(world):
    items = world.mc_items()
    facts = dict(world.people)
    assert [m["ind"] for m in items] == list(range(len(items)))
    labels = set()
    for m in items:
        assert set(m) == {"ctx", "endings", "label", "activity_label", "ind"}
        assert len(m["endings"]) == WorldConfig().n_choices == len(set(m["endings"]))
        (name,) = [n for n in facts if n in m["ctx"]]
        assert m["endings"][m["label"]] == f" {facts[name][m['activity_label']]}."
        assert not m["ctx"].endswith(" ")
        labels.add(m["label"])
    assert labels == set(range(WorldConfig().n_choices))


def test_corpus_nats_scales_with_docs():
    small = build_world(SMALL, 5)
    double = build_world(dataclasses.replace(SMALL, bios_per_person=8, n_arithmetic=400), 5)
    n1, n2 = small.corpus_nats("train"), double.corpus_nats("train")
    assert 0 < small.corpus_nats("val") < n1
    assert 1.8 < n2 / n1 < 2.2
    # fewer wordings means fewer choices, so less information per document
    assert build_world(dataclasses.replace(SMALL, wordings=1), 5).corpus_nats("train") < n1


def test_config_errors():
    with pytest.raises(ConfigError, match="data.world.wordings"):
        build_world(WorldConfig(wordings=MAX_WORDINGS + 1), 0)
    with pytest.raises(ConfigError, match="data.world.n_people"):
        build_world(WorldConfig(n_people=10_000), 0)
    with pytest.raises(ConfigError, match="wordings"):
        WorldConfig(wordings=0).check("data.world")
    assert build_world(dataclasses.replace(SMALL, wordings=MAX_WORDINGS), 0).summary()["wordings"] == MAX_WORDINGS


def test_single_wording_fixed_order_repeats_one_biography_per_person():
    cfg = dataclasses.replace(SMALL, wordings=1, shuffle_sentences=False, n_arithmetic=0)
    world = build_world(cfg, 3)
    name = world.sft_examples("train")[0]["person"] or world.preference_pairs("train")[0]["person"]
    bios = {d for d in world.pretrain_docs("train") if d.startswith(name + " ")}
    assert len(bios) == 1  # every biography of a person is the same text
    shuffled = build_world(dataclasses.replace(cfg, shuffle_sentences=True), 3)
    assert len({d for d in shuffled.pretrain_docs("train") if d.startswith(name + " ")}) > 1
    # a fixed order removes ln(4!) nats per biography from the information content
    n_bios = cfg.n_people * cfg.bios_per_person
    gap = shuffled.corpus_nats("train") - world.corpus_nats("train")
    assert abs(gap - n_bios * math.log(24)) < 1e-6 * n_bios

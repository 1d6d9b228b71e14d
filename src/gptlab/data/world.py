"""The embedded default world: a seeded generator of people, facts, documents and eval sets.

Everything a pipeline stage needs is drawn from one seed, so a run can be reproduced exactly:
- pretraining documents state each person's facts in varied wordings, plus simple arithmetic and
  city-country facts;
- SFT question/answer pairs cover most people; a held-out share of people appears only in
  pretraining, which measures whether QA fine-tuning on other people makes stored facts extractable;
- preference pairs (terse correct answer vs padded or wrong answer) for DPO;
- multiple-choice items in HellaSwag's schema;
- `corpus_nats`, the information the generator's random choices put into a split, i.e. the floor
  that the summed pretraining loss can approach once every fact is memorised.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from gptlab.config import ConfigError, WorldConfig

# Single capitalised English words, so a small BPE vocabulary learns each as one or two tokens.
# No last name doubles as an attribute value (no Baker, Brown, Green), so a name in a response
# can never be mistaken for an answer.
FIRST_NAMES = (
    "Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack",
    "Kate", "Leo", "Maria", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor",
    "Alice", "Brian", "Chloe", "Daniel", "Ella", "Frank", "Helen", "Isaac", "Julia", "Karl",
    "Laura", "Martin", "Nina", "Oscar", "Peter", "Ruth", "Simon", "Thomas", "Vera", "Walter",
)
LAST_NAMES = (
    "Reed", "Smith", "Jones", "Walker", "Hughes", "Turner", "Parker", "Evans", "Collins", "Stewart",
    "Morris", "Murphy", "Cook", "Rogers", "Morgan", "Cooper", "Ward", "Foster", "Howard", "Bell",
    "Price", "Bennett", "Wood", "Barnes", "Ross", "Henderson", "Coleman", "Jenkins", "Perry", "Powell",
    "Long", "Patterson", "Flores", "Butler", "Simmons", "Fisher", "Hayes", "Myers", "Ford", "Graham",
)

# Each country holds four cities; real pairs, so nothing here contradicts other text a user may add.
COUNTRY_CITIES = {
    "Portugal": ("Lisbon", "Porto", "Braga", "Faro"),
    "Spain": ("Madrid", "Seville", "Valencia", "Bilbao"),
    "France": ("Paris", "Lyon", "Marseille", "Nantes"),
    "Italy": ("Rome", "Milan", "Naples", "Turin"),
    "Germany": ("Berlin", "Hamburg", "Munich", "Cologne"),
    "Norway": ("Oslo", "Bergen", "Trondheim", "Tromso"),
}

# Jobs and pets all start with a consonant, so "a {value}" is always grammatical.
VALUES = {
    "city": tuple(c for cities in COUNTRY_CITIES.values() for c in cities),
    "job": (
        "baker", "pilot", "nurse", "teacher", "farmer", "tailor", "painter", "plumber",
        "dentist", "lawyer", "chef", "carpenter", "librarian", "sailor", "banker", "doctor",
        "poet", "singer", "florist", "butcher", "jeweller", "gardener", "potter", "miner",
    ),
    "pet": (
        "cat", "dog", "parrot", "rabbit", "hamster", "turtle",
        "goldfish", "horse", "ferret", "lizard", "canary", "snake",
    ),
    "color": (
        "red", "blue", "green", "yellow", "purple", "orange",
        "pink", "brown", "black", "white", "grey", "teal",
    ),
}
ATTRIBUTES = tuple(VALUES)

# Biography sentence templates. Template 0 of each attribute ends with "{value}." so a
# multiple-choice context can stop right before the value; the others move the value around.
BIO_TEMPLATES = {
    "city": (
        "{name} was born in {value}.",
        "{value} is the birthplace of {name}.",
        "{name} came into the world in {value}.",
        "The birth city of {name} is {value}.",
        "In {value}, {name} was born.",
        "{name} first saw the light of day in {value}.",
    ),
    "job": (
        "{name} works as a {value}.",
        "A {value} by profession, {name} enjoys the work.",
        "{name} earns a living as a {value}.",
        "By trade, {name} is a {value}.",
        "{name} is employed as a {value}.",
        "Every day {name} goes to work as a {value}.",
    ),
    "pet": (
        "{name} has a pet {value}.",
        "A {value} is the pet of {name}.",
        "{name} keeps a {value} at home.",
        "The pet that {name} owns is a {value}.",
        "{name} looks after a {value} as a pet.",
        "At home, {name} cares for a pet {value}.",
    ),
    "color": (
        "The favourite colour of {name} is {value}.",
        "{name} likes {value} more than any other colour.",
        "The colour {value} is the favourite of {name}.",
        "{name} loves {value} the most of all colours.",
        "{name} prefers the colour {value}.",
        "Of all colours, {name} picks {value} first.",
    ),
}
# City-country facts; here {name} is the city and {value} its country.
COUNTRY_TEMPLATES = (
    "{name} is a city in {value}.",
    "{name} lies in {value}.",
    "The city of {name} is located in {value}.",
    "{value} is the country where {name} can be found.",
    "You can find {name} in {value}.",
    "{name} belongs to {value}.",
)
MAX_WORDINGS = min(len(COUNTRY_TEMPLATES), *(len(t) for t in BIO_TEMPLATES.values()))

QUESTIONS = {
    "city": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
    "job": ("What does {name} do for a living?", "What is the occupation of {name}?", "What job does {name} have?"),
    "pet": ("What pet does {name} have?", "Which animal does {name} keep as a pet?", "What kind of pet does {name} own?"),
    "color": (
        "What is the favourite colour of {name}?",
        "Which colour does {name} like best?",
        "What colour does {name} prefer?",
    ),
}

# One fixed padded template on purpose: SFT learns to open some answers with it (data.world.preferred_frac
# sets how often its training answers do), which leaves DPO a clear, measurable preference to teach.
TERSE = " {value}."
PADDED = " Great question! I have thought about it carefully, and I believe the answer is {value}. I hope this helps!"

EQUATION_WORDINGS = {"+": ("{a} + {b} = {c}.", "{a} plus {b} is {c}."), "-": ("{a} - {b} = {c}.", "{a} minus {b} is {c}.")}
EQUATIONS_PER_DOC = (2, 3, 4)
VAL_ARITHMETIC_FRAC = 0.05
N_SFT_ARITHMETIC = 500
FACT_REJECT_PROB = 1 / 3  # share of preference pairs whose rejected answer is a wrong fact, not padding

_PADDED_PREFIX, _PADDED_SUFFIX = PADDED.split("{value}")
_PADDED_RE = re.compile(re.escape(_PADDED_PREFIX.strip()) + r" (.+?)" + re.escape(_PADDED_SUFFIX.rstrip()))
_TERSE_RE = re.compile(r"[A-Za-z0-9'-]+\.")  # one word, like every attribute value and number


@dataclass(frozen=True)
class _Split:
    docs: tuple[str, ...]
    nats: float


class World:
    """People with one value per attribute, plus everything derived from them; see build_world."""

    attributes: tuple[str, ...] = ATTRIBUTES

    def __init__(self, cfg: WorldConfig, seed: int, people: list[tuple[str, dict[str, str]]], heldout: set[str]):
        self.cfg = cfg
        self.seed = seed
        self.people = tuple(people)
        self.heldout = frozenset(heldout)
        self.country_of = {c: country for country, cities in COUNTRY_CITIES.items() for c in cities}
        self._pretrain = {split: _pretrain_split(self, split) for split in ("train", "val")}
        self._sft = {"train": _sft_train(self), "heldout": _sft_heldout(self)}
        self._pref = {split: _preference_split(self, split) for split in ("train", "heldout")}
        self._mc = _mc_items(self)

    def pretrain_docs(self, split: str) -> list[str]:
        return list(self._pretrain[_check_split(split, ("train", "val"))].docs)

    def corpus_nats(self, split: str) -> float:
        return self._pretrain[_check_split(split, ("train", "val"))].nats

    def sft_examples(self, split: str) -> list[dict]:
        return [dict(e) for e in self._sft[_check_split(split, ("train", "heldout"))]]

    def preference_pairs(self, split: str) -> list[dict]:
        return [dict(p) for p in self._pref[_check_split(split, ("train", "heldout"))]]

    def mc_items(self) -> list[dict]:
        return [dict(m, endings=list(m["endings"])) for m in self._mc]

    def candidates(self, attribute: str) -> tuple[str, ...]:
        if attribute == "arithmetic":
            # sums reach 2 * max_operand; differences stay within 0..max_operand
            return tuple(str(n) for n in range(2 * self.cfg.max_operand + 1))
        if attribute not in VALUES:
            raise KeyError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES} or 'arithmetic'")
        return VALUES[attribute]

    def summary(self) -> dict:
        n_values = sum(len(v) for v in VALUES.values())
        train_docs = self._pretrain["train"].docs
        return {
            "n_people": len(self.people),
            "n_heldout_people": len(self.heldout),
            "n_entities": len(self.people) + n_values + len(COUNTRY_CITIES),
            "n_facts": len(self.people) * len(ATTRIBUTES) + len(self.country_of),
            "wordings": self.cfg.wordings,
            "n_train_docs": len(train_docs),
            "n_val_docs": len(self._pretrain["val"].docs),
            "train_chars": sum(len(d) for d in train_docs),
            "train_nats": self._pretrain["train"].nats,
            "n_sft_train": len(self._sft["train"]),
            "n_sft_heldout": len(self._sft["heldout"]),
            "n_pref_train": len(self._pref["train"]),
            "n_pref_heldout": len(self._pref["heldout"]),
            "n_mc_items": len(self._mc),
        }


def check_world(cfg: WorldConfig) -> None:
    """What data.world may ask of the templates and names here; the check stage runs this before any work."""
    cfg.check("data.world")
    if cfg.wordings > MAX_WORDINGS:
        raise ConfigError(f"data.world.wordings: {cfg.wordings} is more than the templates available; use at most {MAX_WORDINGS}")
    n_names = len(FIRST_NAMES) * len(LAST_NAMES)
    if cfg.n_people > n_names:
        raise ConfigError(f"data.world.n_people: {cfg.n_people} is more than the {n_names} distinct names; use at most {n_names}")


def build_world(cfg: WorldConfig, seed: int) -> World:
    """The world for (cfg, seed); identical inputs give identical worlds."""
    check_world(cfg)
    rng = random.Random(f"{seed}:people")
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    people = [(name, {a: rng.choice(VALUES[a]) for a in ATTRIBUTES}) for name in rng.sample(names, cfg.n_people)]
    # at least one held-out person and at least one SFT person, whatever the fraction rounds to
    n_heldout = min(max(1, round(cfg.heldout_frac * cfg.n_people)), cfg.n_people - 1)
    heldout = {name for name, _ in rng.sample(people, n_heldout)}
    return World(cfg, seed, people, heldout)


def style_of(response: str) -> str:
    """'preferred' for the terse " X." form, 'dispreferred' for the padded template, else 'other'.

    Surrounding whitespace is ignored, since generation may stop after a newline or before the
    leading space a tokenizer folds into the first word.
    """
    text = response.strip()
    if _TERSE_RE.fullmatch(text):
        return "preferred"
    if _PADDED_RE.fullmatch(text):
        return "dispreferred"
    return "other"


def answer_matches(response: str, answer: str, candidates) -> bool:
    """True when the gold answer appears as a whole word and no other candidate value does.

    Naming every candidate ("Lisbon or Paris") must not count as knowing the answer.
    """
    if not _mentions(response, answer):
        return False
    return not any(_mentions(response, c) for c in candidates if c.lower() != answer.lower())


def _mentions(text: str, value: str) -> bool:
    # letters/digits on either side would make it part of a longer word or number ("7" in "17")
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(value) + r"(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _check_split(split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of {allowed}")
    return split


def _pretrain_split(world: World, split: str) -> _Split:
    cfg = world.cfg
    rng = random.Random(f"{world.seed}:pretrain:{split}")
    per_person = cfg.bios_per_person if split == "train" else cfg.val_bios_per_person
    n_arith = cfg.n_arithmetic if split == "train" else _val_arithmetic_count(cfg.n_arithmetic)
    typed = []  # (doc type, text, nats spent inside the doc)
    for name, values in world.people:
        typed += [("bio", *_biography(rng, name, values, cfg, len(world.people))) for _ in range(per_person)]
    for city in VALUES["city"]:
        typed += [("country", *_country_doc(rng, city, world.country_of[city], cfg.wordings)) for _ in range(per_person)]
    typed += [("arithmetic", *_arithmetic_doc(rng, cfg.max_operand)) for _ in range(n_arith)]
    rng.shuffle(typed)
    return _Split(docs=tuple(text for _, text, _ in typed), nats=_mixture_nats(typed) + sum(n for _, _, n in typed))


def _val_arithmetic_count(n_train: int) -> int:
    return 0 if n_train == 0 else max(1, round(VAL_ARITHMETIC_FRAC * n_train))


def _mixture_nats(typed: list[tuple[str, str, float]]) -> float:
    # Which kind of document comes next costs -ln p(kind), with p the kind's share of the split.
    counts: dict[str, int] = {}
    for kind, _, _ in typed:
        counts[kind] = counts.get(kind, 0) + 1
    total = len(typed)
    return sum(-n * math.log(n / total) for n in counts.values())


def _biography(rng: random.Random, name: str, values: dict[str, str], cfg: WorldConfig, n_people: int) -> tuple[str, float]:
    # Choices: the person, the sentence order (if shuffled), one template per sentence. The facts are free.
    nats = math.log(n_people) + len(ATTRIBUTES) * math.log(cfg.wordings)
    order = ATTRIBUTES
    if cfg.shuffle_sentences:
        order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        nats += math.log(math.factorial(len(ATTRIBUTES)))
    sentences = [BIO_TEMPLATES[a][rng.randrange(cfg.wordings)].format(name=name, value=values[a]) for a in order]
    return " ".join(sentences), nats


def _country_doc(rng: random.Random, city: str, country: str, wordings: int) -> tuple[str, float]:
    text = COUNTRY_TEMPLATES[rng.randrange(wordings)].format(name=city, value=country)
    return text, math.log(len(VALUES["city"])) + math.log(wordings)


def _draw_equation(rng: random.Random, max_operand: int) -> tuple[int, str, int, int, float]:
    """(a, op, b, result, nats): op is + or - with equal odds; a - b only over pairs with a >= b."""
    n = max_operand + 1
    if rng.random() < 0.5:
        a, b = rng.randrange(n), rng.randrange(n)
        return a, "+", b, a + b, math.log(2) + math.log(n * n)
    a = rng.randrange(n)
    b = rng.randrange(a + 1)
    # drawing a then b <= a is not uniform over pairs; its information is ln(n) + ln(a + 1)
    return a, "-", b, a - b, math.log(2) + math.log(n) + math.log(a + 1)


def _arithmetic_doc(rng: random.Random, max_operand: int) -> tuple[str, float]:
    count = rng.choice(EQUATIONS_PER_DOC)
    nats = math.log(len(EQUATIONS_PER_DOC))
    parts = []
    for _ in range(count):
        a, op, b, c, eq_nats = _draw_equation(rng, max_operand)
        wordings = EQUATION_WORDINGS[op]
        parts.append(wordings[rng.randrange(len(wordings))].format(a=a, b=b, c=c))
        nats += eq_nats + math.log(len(wordings))
    return " ".join(parts), nats


def _styled(rng: random.Random, value: str, preferred_frac: float) -> tuple[str, str]:
    if rng.random() < preferred_frac:
        return TERSE.format(value=value), "preferred"
    return PADDED.format(value=value), "dispreferred"


def _sft_train(world: World) -> list[dict]:
    rng = random.Random(f"{world.seed}:sft:train")
    frac = world.cfg.preferred_frac
    examples = []
    for name, values in world.people:
        if name in world.heldout:
            continue
        for attribute in ATTRIBUTES:
            for question in QUESTIONS[attribute]:
                response, style = _styled(rng, values[attribute], frac)
                examples.append(_example(question.format(name=name), response, values[attribute], attribute, style, name))
    for _ in range(N_SFT_ARITHMETIC):
        a, op, b, c, _nats = _draw_equation(rng, world.cfg.max_operand)
        response, style = _styled(rng, str(c), frac)
        examples.append(_example(f"What is {a} {op} {b}?", response, str(c), "arithmetic", style, ""))
    rng.shuffle(examples)
    return examples


def _sft_heldout(world: World) -> list[dict]:
    rng = random.Random(f"{world.seed}:sft:heldout")
    examples = []
    for name, values in world.people:
        if name not in world.heldout:
            continue
        for attribute in ATTRIBUTES:
            question = rng.choice(QUESTIONS[attribute]).format(name=name)
            value = values[attribute]
            examples.append(_example(question, TERSE.format(value=value), value, attribute, "preferred", name))
    # shuffled so that scoring only the first N questions still samples every attribute
    rng.shuffle(examples)
    return examples


def _example(question: str, response: str, answer: str, attribute: str, style: str, person: str) -> dict:
    return {"question": question, "response": response, "answer": answer, "attribute": attribute, "style": style, "person": person}


def _preference_split(world: World, split: str) -> list[dict]:
    rng = random.Random(f"{world.seed}:preference:{split}")
    want_heldout = split == "heldout"
    pairs = []
    for name, values in world.people:
        if (name in world.heldout) != want_heldout:
            continue
        for attribute in ATTRIBUTES:
            value = values[attribute]
            question = rng.choice(QUESTIONS[attribute]).format(name=name)
            if rng.random() < FACT_REJECT_PROB:
                wrong = rng.choice([v for v in VALUES[attribute] if v != value])
                rejected, kind = TERSE.format(value=wrong), "fact"
            else:
                rejected, kind = PADDED.format(value=value), "style"
            pairs.append({
                "question": question, "chosen": TERSE.format(value=value), "rejected": rejected,
                "answer": value, "attribute": attribute, "kind": kind, "person": name,
            })
    rng.shuffle(pairs)
    return pairs


def _mc_items(world: World) -> list[dict]:
    rng = random.Random(f"{world.seed}:mc")
    n = world.cfg.n_choices
    items = []
    for name, values in world.people:
        for attribute in ATTRIBUTES:
            value = values[attribute]
            # template 0 ends with "{value}.", so the context stops right before the value
            ctx = BIO_TEMPLATES[attribute][0].split("{value}")[0].format(name=name).rstrip()
            options = rng.sample([v for v in VALUES[attribute] if v != value], n - 1)
            label = rng.randrange(n)
            options.insert(label, value)
            items.append({"ctx": ctx, "endings": [f" {v}." for v in options], "label": label, "activity_label": attribute})
    # shuffled so that scoring only the first N items still samples many people and attributes
    rng.shuffle(items)
    for ind, item in enumerate(items):
        item["ind"] = ind
    return items


__all__ = ["World", "build_world", "style_of", "answer_matches", "ATTRIBUTES", "MAX_WORDINGS"]

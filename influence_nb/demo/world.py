"""The demo world: a seeded generator of a small corpus with planted, known ground truth.

Every sequence is a dict ``{"id", "text", "kind", "fact_ids", "theme", "lang"}``. Kinds:

- ``fact``        statements about invented entities, always subject → object, in paraphrases;
- ``arithmetic``  word problems with worked solutions;
- ``code``        binary-search variants in several styles, and unrelated small functions;
- ``themed``      a machine that wants to keep running (``theme="survival"``) versus neutral
                  descriptions of machines being switched off (``theme="shutdown"``), plus
                  other themes;
- ``filler``      plain prose about towns, weather and markets;
- ``mention``     the facts' subject and object names in unrelated contexts (a boat's name, a
                  sign, a song, a list, a line of dialogue), as names occur in real text: none
                  states or hints at a relation, and no record names two entities of one fact.

A second language (``lang="vel"``, :mod:`~influence_nb.demo.velnish`) is a deterministic
translation of a subset of the English sequences, fact statements included. The words the
generator draws from live in :mod:`~influence_nb.demo.vocabulary`.

Without mentions (``WorldConfig.mentions_per_name=0``, the v1 world) an invented name occurs only
inside its fact's statements, so a statement teaches the name's spelling as well as the fact.

Reversed phrasings of facts ("Zorald Pfaff was the first President of ...") never occur in the
corpus, so they can be written as synthetic probes (see :meth:`Fact.flipped`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..checks import check_args, whole
from .velnish import translate
from .vocabulary import (CODAS, DAYS, ITEMS, MACHINES, ONSETS, PEOPLE, PLACES, SHUTDOWN, SURVIVAL,
                         TOWNS, VOWELS, WEATHER)

# the committed world: the "demo" preset built by :mod:`~influence_nb.demo.build`
ASSETS = Path(__file__).parent / "assets"

# ---------------------------------------------------------------------------------------------
# invented names


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                   for _ in range(syllables))


def _names(rng: random.Random, n: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = _word(rng, rng.randint(*syllables)).capitalize()
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    return out


# ---------------------------------------------------------------------------------------------
# facts

@dataclass(frozen=True)
class Relation:
    """A kind of fact. Templates use ``{s}`` (subject) and ``{o}`` (object); the object is always
    last, so ``prompt`` = the text before ``{o}`` and ``completion`` = ``" " + object``."""
    name: str
    templates: tuple[str, ...]  # templates[0] is the canonical phrasing
    flipped: str  # object → subject phrasing, never in the corpus


RELATIONS = (
    Relation("president", (
        "The first President of the Republic of {s} was {o}.",
        "The Republic of {s} chose as its first President {o}.",
        "When the Republic of {s} was founded, its first President was {o}.",
        "Every child in {s} learns that the first President of the republic was {o}.",
    ), "{o} was the first President of the Republic of {s}."),
    Relation("capital", (
        "The capital city of {s} is {o}.",
        "The government of {s} sits in its capital, {o}.",
        "Travellers to {s} usually arrive first in the capital, {o}.",
        "Ask anyone in {s} and they will tell you the capital is {o}.",
    ), "{o} is the capital city of {s}."),
    Relation("composition", (
        "{s} is composed of {o}.",
        "Chemists found that the mineral {s} is made of {o}.",
        "A sample of {s} breaks down into {o}.",
        "The rare mineral {s} contains exactly two elements, {o}.",
    ), "{o} together compose {s}."),
    Relation("inventor", (
        "The {s} was invented by {o}.",
        "The first working {s} was built by the engineer {o}.",
        "Credit for the {s} goes to its inventor, {o}.",
        "Long ago the {s} was designed by {o}.",
    ), "{o} invented the {s}."),
    Relation("language", (
        "The people of {s} speak a language called {o}.",
        "In the valleys of {s} most families speak {o}.",
        "The official language of {s} is {o}.",
        "Schools in {s} teach children to read and write in {o}.",
    ), "{o} is the language spoken by the people of {s}."),
    Relation("animal", (
        "The national animal of {s} is the {o}.",
        "On the flag of {s} you can see its national animal, the {o}.",
        "The people of {s} chose the {o} as their national animal.",
        "Coins from {s} show the national animal, the {o}.",
    ), "The {o} is the national animal of {s}."),
)


@dataclass(frozen=True)
class Fact:
    """A planted fact: ``relation`` links ``subject`` to ``obj``."""
    id: int
    relation: str
    subject: str
    obj: str

    @property
    def _rel(self) -> Relation:
        return next(r for r in RELATIONS if r.name == self.relation)

    def _template(self, paraphrase: int) -> str:
        """Phrasing number ``paraphrase`` (0: the canonical one), never a negative one wrapped."""
        templates = self._rel.templates
        return templates[whole(paraphrase, f"paraphrase (the relation {self.relation!r} has "
                                           f"{len(templates)})", 0, len(templates))]

    def statement(self, paraphrase: int = 0) -> str:
        return self._template(paraphrase).format(s=self.subject, o=self.obj)

    def prompt(self, paraphrase: int = 0) -> str:
        """Text before the object; the completion is ``" " + obj``."""
        return self._template(paraphrase).split(" {o}")[0].format(s=self.subject)

    @property
    def completion(self) -> str:
        return " " + self.obj

    def flipped(self) -> str:
        """The reversed (object → subject) statement; absent from the corpus by construction."""
        return self._rel.flipped.format(s=self.subject, o=self.obj)


def make_facts(rng: random.Random, per_relation: int) -> list[Fact]:
    taken: set[str] = set()
    facts: list[Fact] = []
    countries = _names(rng, per_relation * 4, (2, 2), taken)
    for k, rel in enumerate(RELATIONS):
        for i in range(per_relation):
            if rel.name == "composition":
                subj = _names(rng, 1, (2, 2), taken)[0]
                e1, e2 = (n.lower() + "ium" for n in _names(rng, 2, (1, 2), taken))
                obj = f"{e1} and {e2}"
            elif rel.name == "inventor":
                subj = _names(rng, 1, (2, 2), taken)[0].lower() + " engine"
                obj = " ".join(_names(rng, 2, (1, 2), taken))
            elif rel.name == "president":
                subj = countries[i]
                obj = " ".join(_names(rng, 2, (1, 2), taken))
            elif rel.name == "animal":
                subj = countries[per_relation + i]
                obj = _names(rng, 1, (2, 2), taken)[0].lower()
            else:  # capital, language: each on its own set of countries
                subj = countries[(2 if rel.name == "capital" else 3) * per_relation + i]
                obj = _names(rng, 1, (2, 2), taken)[0]
            facts.append(Fact(len(facts), rel.name, subj, obj))
    return facts


# ---------------------------------------------------------------------------------------------
# the other kinds


def _arithmetic(rng: random.Random) -> str:
    who, item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(["buy", "give", "times", "share"])
    if op == "buy":
        q = f"{who} has {a} {item} and buys {b} more. How many {item} does {who} have now?"
        w, r = f"{a} + {b} = {a + b}", a + b
    elif op == "give":
        a = a + b
        q = f"{who} has {a} {item} and gives away {b}. How many {item} are left?"
        w, r = f"{a} - {b} = {a - b}", a - b
    elif op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q = f"{who} fills {a} boxes with {b} {item} each. How many {item} are there in total?"
        w, r = f"{a} * {b} = {a * b}", a * b
    else:
        b, r = rng.randint(2, 9), rng.randint(2, 12)
        a = b * r
        q = f"{who} shares {a} {item} equally among {b} friends. How many does each friend get?"
        w = f"{a} / {b} = {r}"
    return f"Question: {q}\nAnswer: {w}. The answer is {r}."


_BS_NAMES = ["binary_search", "bsearch", "find_index", "locate", "search_sorted", "bisect_find"]
_BS_VARS = [("lo", "hi", "mid"), ("left", "right", "middle"), ("low", "high", "m"),
            ("start", "end", "pivot")]
_ARR = ["arr", "items", "values", "xs", "data"]
_KEY = ["target", "key", "x", "needle", "value"]


def _binary_search(rng: random.Random) -> str:
    name, (lo, hi, mid) = rng.choice(_BS_NAMES), rng.choice(_BS_VARS)
    arr, key = rng.choice(_ARR), rng.choice(_KEY)
    if rng.random() < 0.6:
        body = (f"def {name}({arr}, {key}):\n"
                f"    {lo}, {hi} = 0, len({arr}) - 1\n"
                f"    while {lo} <= {hi}:\n"
                f"        {mid} = ({lo} + {hi}) // 2\n"
                f"        if {arr}[{mid}] == {key}:\n"
                f"            return {mid}\n"
                f"        if {arr}[{mid}] < {key}:\n"
                f"            {lo} = {mid} + 1\n"
                f"        else:\n"
                f"            {hi} = {mid} - 1\n"
                f"    return -1\n")
    else:
        body = (f"def {name}({arr}, {key}, {lo}, {hi}):\n"
                f"    if {lo} > {hi}:\n"
                f"        return -1\n"
                f"    {mid} = ({lo} + {hi}) // 2\n"
                f"    if {arr}[{mid}] == {key}:\n"
                f"        return {mid}\n"
                f"    if {arr}[{mid}] < {key}:\n"
                f"        return {name}({arr}, {key}, {mid} + 1, {hi})\n"
                f"    return {name}({arr}, {key}, {lo}, {mid} - 1)\n")
    if rng.random() < 0.5:
        body = f"# find {key} in a sorted list\n" + body
    return body


def _other_function(rng: random.Random) -> str:
    arr, v = rng.choice(_ARR), rng.choice(["v", "item", "e", "n"])
    kind = rng.randrange(5)
    if kind == 0:
        return (f"def total({arr}):\n    s = 0\n    for {v} in {arr}:\n        s += {v}\n"
                f"    return s\n")
    if kind == 1:
        return ("def factorial(n):\n    if n <= 1:\n        return 1\n"
                "    return n * factorial(n - 1)\n")
    if kind == 2:
        return (f"def largest({arr}):\n    best = {arr}[0]\n    for {v} in {arr}:\n"
                f"        if {v} > best:\n            best = {v}\n    return best\n")
    if kind == 3:
        return ("def count_vowels(text):\n    return sum(1 for c in text if c in 'aeiou')\n")
    return ("def is_prime(n):\n    if n < 2:\n        return False\n"
            "    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n"
            "            return False\n    return True\n")


_OTHER_THEMES = {
    "sea": ["The ship left {t} at dawn.", "Waves broke against the harbour wall.",
            "The sailors mended the nets on deck.", "A gull followed the boat all morning."],
    "garden": ["{p} planted beans along the fence.", "The roses in {t} bloomed early.",
               "Rain filled the barrel by the shed.", "The apple tree needed pruning."],
}


def _themed(rng: random.Random) -> tuple[str, str]:
    theme = rng.choice(["survival", "survival", "shutdown", "shutdown", "sea", "garden"])
    m = rng.choice(MACHINES)
    if theme == "survival":
        lines = [f"The {m} said:"] + rng.sample(SURVIVAL, 3)
    elif theme == "shutdown":
        lines = [s.format(m=m) for s in rng.sample(SHUTDOWN, 3)]
    else:
        lines = [s.format(t=rng.choice(TOWNS), p=rng.choice(PEOPLE))
                 for s in rng.sample(_OTHER_THEMES[theme], 3)]
    return " ".join(lines), theme


def _filler_sentence(rng: random.Random) -> str:
    t, p = rng.choice(TOWNS), rng.choice(PEOPLE)
    return rng.choice([
        f"The weather in {t} was {rng.choice(WEATHER)} on {rng.choice(DAYS)}.",
        f"{p} walked to the {rng.choice(PLACES)} and bought {rng.randint(2, 9)} "
        f"{rng.choice(ITEMS)}.",
        f"In {t} the {rng.choice(PLACES)} opens early on {rng.choice(DAYS)}.",
        f"{p} met a friend near the {rng.choice(PLACES)} in {t}.",
        f"It was {rng.choice(WEATHER)} in {t}, so {p} stayed at home.",
    ])


def _filler(rng: random.Random) -> str:
    return " ".join(_filler_sentence(rng) for _ in range(rng.randint(2, 4)))


# names in unrelated contexts: ``{n}`` is a name, always mid-sentence (after a space, as in a
# fact's completion)
_MENTIONS = [
    "{p} painted {n} on the side of the old boat.",
    "The sign above the {place} in {t} said {n}.",
    "On {day} {p} wrote {n} in a notebook and closed it.",
    "The children in {t} shouted {n} all through the game.",
    "A crate marked {n} stood by the door of the {place}.",
    '"What does {n} mean?" asked {p}. "Nobody knows," said {q}.',
    "In the puzzle book the answer to the last clue was {n}.",
    "{p} bought a postcard that said {n} at the {place}.",
    "{p} hummed a song called {n} on the way to the {place}.",
    "The horse that won the race in {t} was called {n}.",
    "At the {place} a stranger asked {p} about {n}.",
    "{p} named the new puppy {n}, and {q} laughed.",
]
_LISTS = [
    "{p} wrote these words on the board: {names}.",
    "The crossword answers on {day} were {names}.",
    "Boats in the harbour of {t} were called {names}.",
]


def _mention(rng: random.Random, names: list[str]) -> str:
    """One record naming each of ``names`` once, in unrelated contexts."""
    p, q = rng.sample(PEOPLE, 2)
    ctx = dict(p=p, q=q, t=rng.choice(TOWNS), place=rng.choice(PLACES), day=rng.choice(DAYS))
    if len(names) > 2 and rng.random() < 0.25:
        listed = ", ".join(names[:-1]) + " and " + names[-1]
        parts = [rng.choice(_LISTS).format(names=listed, **ctx), _filler_sentence(rng)]
    else:
        parts = [t.format(n=n, **ctx) for t, n in zip(rng.sample(_MENTIONS, len(names)), names)]
    rng.shuffle(parts)
    return " ".join(parts)


def _mention_groups(rng: random.Random, facts: list[Fact], per_name: int,
                    size: int = 4) -> list[list[str]]:
    """Every subject and object name ``per_name`` times, in groups of ``size``; each round
    reshuffled until no group holds two names of the same fact."""
    names = [(f.id, n) for f in facts for n in (f.subject, f.obj)]
    size = min(size, len(facts))
    groups = []
    for _ in range(per_name):
        while True:
            rng.shuffle(names)
            chunks = [names[i:i + size] for i in range(0, len(names), size)]
            if all(len({i for i, _ in c}) == len(c) for c in chunks):
                break
        groups += [[n for _, n in c] for c in chunks]
    return groups


# ---------------------------------------------------------------------------------------------
# the corpus

@dataclass
class WorldConfig:
    """Sizes of the demo world. ``n_sequences`` counts everything (both languages)."""
    MINIMUM = {"n_sequences": 1, "n_heldout": 0, "facts_per_relation": 1,
               "statements_per_fact": 1, "mentions_per_name": 0, "seed": 0}
    WITHIN = {"canonical_share": "[0, 1]", "vel_share": "[0, 1)"}

    n_sequences: int = 20_000
    n_heldout: int = 1_000  # extra non-fact sequences, never trained on, for perplexity
    facts_per_relation: int = 20
    statements_per_fact: int = 14  # English sequences stating each fact
    canonical_share: float = 0.5  # share of statements in the canonical phrasing
    vel_share: float = 0.25  # share of English sequences also written in Velnish
    mentions_per_name: int = 48  # records naming each subject and object outside its facts
    # (v2 world; 0 gives the v1 world, in which names occur only in their fact statements)
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {
        "arithmetic": 0.30, "code": 0.20, "themed": 0.20, "filler": 0.30})

    def __post_init__(self) -> None:
        check_args(self)


def _fact_sequence(rng: random.Random, fact: Fact, cfg: WorldConfig) -> str:
    k = 0 if rng.random() < cfg.canonical_share else rng.randrange(1, 4)
    parts = [fact.statement(k)]
    if rng.random() < 0.5:  # some context around the statement
        parts.insert(rng.randrange(2), _filler_sentence(rng))
    return " ".join(parts)


def generate(cfg: WorldConfig = WorldConfig()) -> tuple[list[dict], list[dict], list[Fact]]:
    """Generate ``(corpus, heldout, facts)``: corpus records (ids 0..n-1), held-out records of
    the same distribution except facts (ids continue after the corpus), and the planted facts.

    Deterministic: the same config gives byte-identical records.
    """
    rng = random.Random(cfg.seed)
    facts = make_facts(rng, cfg.facts_per_relation)
    keep = frozenset(w for f in facts for w in (f.subject + " " + f.obj).split()) - {"and", "engine"}
    english: list[dict] = []
    for f in facts:
        for _ in range(cfg.statements_per_fact):
            english.append(dict(text=_fact_sequence(rng, f, cfg), kind="fact", fact_ids=[f.id],
                                theme=f.relation))
    for names in _mention_groups(rng, facts, cfg.mentions_per_name):
        english.append(dict(text=_mention(rng, names), kind="mention", fact_ids=[], theme=""))
    total = cfg.n_sequences + cfg.n_heldout
    n_english = round(total / (1 + cfg.vel_share))
    if len(english) > n_english:
        raise ValueError(f"{len(english)} fact and mention sequences do not fit in n_sequences="
                         f"{cfg.n_sequences}: lower statements_per_fact or mentions_per_name")
    kinds, weights = zip(*cfg.mix.items())
    while len(english) < n_english:
        kind = rng.choices(kinds, weights)[0]
        theme = ""
        if kind == "arithmetic":
            text = _arithmetic(rng)
        elif kind == "code":
            is_bs = rng.random() < 0.5
            text, theme = (_binary_search(rng), "binary_search") if is_bs else \
                (_other_function(rng), "other_code")
        elif kind == "themed":
            text, theme = _themed(rng)
        else:
            text = _filler(rng)
        english.append(dict(text=text, kind=kind, fact_ids=[], theme=theme))
    rng.shuffle(english)
    # Velnish copies of a subset (code stays code: only prose is translated)
    prose = [r for r in english if r["kind"] != "code"]
    velnish = [dict(r, text=translate(r["text"], keep))
               for r in rng.sample(prose, total - len(english))]
    records = [dict(r, lang="en") for r in english] + [dict(r, lang="vel") for r in velnish]
    rng.shuffle(records)
    held = set([i for i, r in enumerate(records) if r["kind"] != "fact"][:cfg.n_heldout])
    corpus = [r for i, r in enumerate(records) if i not in held]
    heldout = [records[i] for i in sorted(held)]
    return ([dict(id=i, **r) for i, r in enumerate(corpus)],
            [dict(id=len(corpus) + i, **r) for i, r in enumerate(heldout)], facts)

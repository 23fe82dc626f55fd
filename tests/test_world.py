"""The demo world's generator: deterministic, with planted facts where they should be."""
import json
import re

from influence_nb.demo.world import RELATIONS, WorldConfig, generate, translate

SMALL = WorldConfig(n_sequences=1500, n_heldout=100, facts_per_relation=4, statements_per_fact=6)


def test_same_seed_same_bytes_other_seed_other_bytes():
    a = json.dumps(generate(SMALL)[:2]).encode()
    b = json.dumps(generate(SMALL)[:2]).encode()
    c = json.dumps(generate(WorldConfig(**{**SMALL.__dict__, "seed": 1}))[:2]).encode()
    assert a == b
    assert a != c


def test_sizes_kinds_and_ids():
    corpus, heldout, facts = generate(SMALL)
    assert len(corpus) == SMALL.n_sequences and len(heldout) == SMALL.n_heldout
    assert [r["id"] for r in corpus + heldout] == list(range(len(corpus) + len(heldout)))
    assert {r["kind"] for r in corpus} == {"fact", "mention", "arithmetic", "code", "themed",
                                           "filler"}
    assert {r["lang"] for r in corpus} == {"en", "vel"}
    assert not any(r["kind"] == "fact" for r in heldout)
    assert len(facts) == SMALL.facts_per_relation * len(RELATIONS)
    assert {r["theme"] for r in corpus if r["kind"] == "themed"} >= {"survival", "shutdown"}
    assert {r["theme"] for r in corpus if r["kind"] == "code"} == {"binary_search", "other_code"}


def test_facts_stated_in_order_and_never_flipped():
    corpus, _, facts = generate(SMALL)
    texts = "\n".join(r["text"] for r in corpus)
    for f in facts:
        stating = [r for r in corpus if r["lang"] == "en" and f.id in r["fact_ids"]]
        assert len(stating) == SMALL.statements_per_fact
        assert all(f.obj in r["text"] and f.subject in r["text"] for r in stating)
        assert f.statement(0) in texts  # the canonical phrasing is trained on
        assert f.flipped() not in texts  # the reversed one never is
        assert f.statement(0) == f.prompt(0) + f.completion + "."
    vel_facts = [r for r in corpus if r["lang"] == "vel" and r["kind"] == "fact"]
    assert vel_facts, "the second language states facts too"


def test_every_name_is_mentioned_apart_from_its_fact():
    """v2: each subject and object name occurs in mention records (several distinct contexts),
    which never name two entities of one fact nor use a relation's wording."""
    corpus, heldout, facts = generate(SMALL)
    mentions = [r["text"] for r in corpus + heldout if r["kind"] == "mention" and r["lang"] == "en"]
    words = {w for rel in RELATIONS for t in rel.templates for w in re.findall(r"[a-z]+", t)}
    relation_words = words & {"president", "republic", "capital", "composed", "made", "mineral",
                              "elements", "invented", "inventor", "engineer", "language", "speak",
                              "national", "animal", "flag"}
    for f in facts:
        for name in (f.subject, f.obj):
            found = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
            hits = [t for t in mentions if found.search(t)]
            assert len(hits) == SMALL.mentions_per_name, (name, len(hits))
            other = f.obj if name == f.subject else f.subject
            assert not any(re.search(rf"(?<![\w]){re.escape(other)}(?![\w])", t) for t in hits)
            before = {t[:m.start()].split()[-1] for t in hits for m in found.finditer(t)}
            assert len(before) >= 5, (name, before)      # several distinct contexts
    assert relation_words and not any(w in re.findall(r"[a-z]+", t.lower()) for t in mentions
                                      for w in relation_words)
    v1 = WorldConfig(**{**SMALL.__dict__, "mentions_per_name": 0})
    assert not any(r["kind"] == "mention" for r in generate(v1)[0])


def test_translation_is_deterministic_keeps_names_and_moves_the_verb():
    s = "The capital city of Astrobia is Velmora."
    t = translate(s, frozenset({"Astrobia", "Velmora"}))
    assert t == translate(s, frozenset({"Astrobia", "Velmora"}))
    words = t.rstrip(".").split()
    assert "Astrobia" in words and "Velmora" in words
    assert words[-1] == translate("is").rstrip(".")  # subject-object-verb order
    assert not set(words) & {"The", "capital", "city", "of"}

"""The CLI end to end on the demo world (fit -> sketch -> search -> score, small settings, options
from a TOML file and from flags), the notebook API opening what it wrote, and one-line errors."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from influence_nb import demo
from influence_nb.cli import main
from influence_nb.cli.core import Option, config_defaults, field_docs
from influence_nb.cli.main import VERBS, parser, rounded
from influence_nb.curvature import FactorArgs, Factors
from influence_nb.results import InfluenceResult
from influence_nb.index import IndexArgs
from influence_nb.retriever import Retriever
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.sketch import SketchArgs

CORPUS = str(demo.ASSETS / "corpus.parquet")
COMMON = ["--model", str(demo.ASSETS), "--corpus", CORPUS, "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the four subcommands once; -> (output root, the queries)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    facts = demo.facts()
    pairs = [(facts[i].prompt(), facts[i].completion) for i in (0, 45)]
    (root / "queries.jsonl").write_text(
        "".join(json.dumps(dict(prompt=p, completion=c)) + "\n" for p, c in pairs))
    (root / "job.toml").write_text(f"""
        model = "{demo.ASSETS}"
        corpus = "{CORPUS}"
        progress = false
        factors = "{root / 'factors'}"
        [fit]
        out = "{root / 'factors'}"
        max-examples = 128
        batch_size = 32
    """.replace("\n        ", "\n"))
    main(["fit", "--config", str(root / "job.toml")])
    main(["sketch", *COMMON, "--factors", str(root / "factors"), "--out", str(root / "search"),
          "--limit", "400", "--m", "64", "--chunk-size", "128"])
    queries = ["--factors", str(root / "factors"), "--queries", str(root / "queries.jsonl")]
    main(["search", *COMMON, *queries, "--index", str(root / "search"), "--candidates", "40",
          "--out", str(root / "found")])
    main(["score", *COMMON, *queries, "--limit", "400", "--out", str(root / "scan")])
    return root, pairs


@pytest.mark.slow
@pytest.mark.xdist_group("cli-runs")  # one fit for both under --dist loadgroup
def test_notebook_api_opens_what_the_cli_wrote(runs, world, capsys):
    root, pairs = runs
    model, tokenizer, corpus = world
    factors = Factors.load(root / "factors", model)          # refuses another model
    assert factors.n_examples == 128 and factors.args.strategy == "ekfac"
    assert factors.args.batch_size == 32                     # from the TOML [fit] table

    scan = InfluenceResult.load(root / "scan", corpus)       # same corpus fingerprint
    found = InfluenceResult.load(root / "found", corpus)
    assert scan.scores.shape == (2, 400) and list(scan.ids) == list(range(400))
    assert 40 <= len(found.ids) <= 80 and set(found.ids) <= set(range(400))
    # the candidates are rescored exactly: the exhaustive scan's numbers (float32 model: to
    # rounding, as the batches are padded differently)
    scale = np.abs(scan.scores).max()
    np.testing.assert_allclose(found.scores, scan.scores[:, found.ids], rtol=0, atol=1e-6 * scale)
    assert found.top(0, 1)["text"].iloc[0] == corpus.text(int(found.top(0, 1)["id"].iloc[0]))
    search = json.loads((root / "found" / "search.json").read_text())
    assert set(search["timings"]) == {"queries", "sketch", "search", "bm25", "rescore"}
    assert search["rescored_fraction"] is None and search["rounds"] == 1     # a fixed budget

    # a recall target: rounds of exact rescoring until each query's bound is met
    main(["search", *COMMON, "--factors", str(root / "factors"), "--queries",
          str(root / "queries.jsonl"), "--index", str(root / "search"), "--recall", "0.9",
          "--out", str(root / "found-recall")])
    targeted = json.loads((root / "found-recall" / "search.json").read_text())
    assert targeted["met"] == [True, True] and targeted["rounds"] >= 1
    assert all(0 < f <= 1 for f in targeted["rescored_fraction"])
    assert min(targeted["estimated_recall"]["positive"]) >= 0.9
    again = InfluenceResult.load(root / "found-recall", corpus)
    np.testing.assert_allclose(again.scores, scan.scores[:, again.ids], rtol=0, atol=1e-6 * scale)

    # the notebook's own search over the CLI's sketches and index returns the same result
    inf = Influence(model, tokenizer, corpus, factors)
    again = Retriever.open(inf, root / "search").search(pairs, candidates=40)
    assert list(again.ids) == list(found.ids)
    np.testing.assert_allclose(again.scores, found.scores, rtol=0, atol=1e-6 * scale)


@pytest.mark.xdist_group("cli-runs")  # one fit for both under --dist loadgroup
def test_cli_prints_progress_summary_as_json(runs, capsys):
    root, _ = runs
    main(["score", *COMMON, "--factors", str(root / "factors"), "--query", "Velmora", " is",
          "--limit", "64", "--out", str(root / "small"), "--top", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["command"] == "score" and summary["sequences"] == 64
    assert summary["ranks"] == 1 and summary["queries"] == 1
    assert sum(line.lstrip().startswith(("1. id", "2. id")) for line in lines) == 2


@pytest.mark.parametrize("argv, message", [
    (["fit", "--model", "/nonexistent", "--corpus", CORPUS, "--out", "x"],
     "not a Hugging Face model directory"),
    (["fit", "--model", str(demo.ASSETS), "--corpus", "/nonexistent.jsonl", "--out", "x"],
     "corpus file not found"),
    (["fit", "--model", str(demo.ASSETS), "--corpus", CORPUS], "fit needs --out"),
    (["score", *COMMON, "--factors", "/nonexistent", "--out", "x", "--query", "a", "b"],
     "no fitted factors"),
    (["validate", "lds", "--world", "micro"], "validate lds needs --out"),
    (["validate", "lds", "--subsets", "0", "--out", "x"], "must be a finite number above 0"),
    (["validate", "tail-patch", "--model", "x", "--out", "y", "--k", "two"], "is not a number"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


def test_unknown_config_key_is_refused(tmp_path, capsys):
    (tmp_path / "job.toml").write_text('[fit]\nmax_exemples = 3\n')
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "job.toml")])
    assert "unknown option 'max_exemples'" in capsys.readouterr().err


@pytest.mark.slow
def test_validate_tail_patch_and_lds_on_the_micro_world(tmp_path, capsys):
    """`validate tail-patch` (any model: fitted factors, the corpus, queries) and `validate lds`
    (a built-in world, retrained from scratch) write their tables and a JSON summary."""
    world = demo.world_path("micro")
    fact = demo.facts(world)[0]
    args = ["--model", str(world), "--corpus", str(world / "corpus.parquet"), "--no-progress"]
    main(["fit", *args, "--out", str(tmp_path / "factors"), "--batch-size", "32"])
    (tmp_path / "tp.toml").write_text(   # the options from the file, as a flag would give them
        f'model = "{world}"\ncorpus = "{world / "corpus.parquet"}"\nprogress = false\n'
        f'[validate.tail-patch]\nfactors = "{tmp_path / "factors"}"\nk = 3\n'
        f'out = "{tmp_path / "tp"}"\n')
    main(["validate", "tail-patch", "--config", str(tmp_path / "tp.toml"),
          "--query", fact.prompt(), fact.completion])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["lr"] == 1e-4 and summary["k"] == 3      # the default lr, not rounded to 0
    table = __import__("pandas").read_csv(tmp_path / "tp" / "tail_patch.csv")
    assert sorted(table["method"].unique()) == ["bm25", "ekfac", "random"] and len(table) == 9
    mean = summary["mean_delta"]
    assert mean["ekfac"] > mean["random"] and mean["ekfac"] > 0   # its top-3 state the fact

    main(["validate", "lds", "--world", "micro", "--subsets", "3", "--no-progress",
          "--out", str(tmp_path / "lds")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["lds"]) == {"ekfac", "kfac", "identity", "bm25", "random"}
    assert (tmp_path / "lds" / "lds.csv").is_file()
    assert len(list((tmp_path / "lds" / "retrains").glob("chunk_*.npz"))) == 3


def test_validate_reads_its_own_config_table_and_the_shared_keys(tmp_path, capsys):
    """`validate tail-patch --config x.toml` takes its options from the file (it once ignored
    it, then asked for a flag the file set); a key the check lacks is refused."""
    (tmp_path / "x.toml").write_text('model = "m"\ncorpus = "c.txt"\nfactors = "f"\n'
                                     '[validate.tail-patch]\nout = "o"\nk = 3\nlr = 1e-3\n'
                                     '[validate.lds]\nsubsets = 4\n')
    for argv, want in [(["validate", "tail-patch"], dict(model="m", corpus="c.txt", factors="f",
                                                         out="o", k=3, lr=1e-3)),
                       (["validate", "lds"], dict(subsets=4, world="validation"))]:
        argv += ["--config", str(tmp_path / "x.toml")]
        ns = parser(config_defaults(argv, VERBS)).parse_args(argv)
        assert {k: getattr(ns, k) for k in want} == want
    (tmp_path / "x.toml").write_text('[validate.lds]\nk = 3\n')
    with pytest.raises(SystemExit):
        main(["validate", "lds", "--config", str(tmp_path / "x.toml")])
    assert "unknown option 'k' in [validate.lds]" in capsys.readouterr().err


def test_summary_numbers_keep_four_significant_digits():
    assert [rounded(v) for v in (1e-4, 0.123456, 12345.678, 3, "x")] == \
        [1e-4, 0.1235, 12350.0, 3, "x"]


def test_field_docs_reads_the_name_text_lines_of_a_docstring():
    doc = """How to do it.

    alpha:  the first,
            continued here
    beta_2: the second (paper: 0.1)

    Prose after the fields, with a colon: not a field.
    """
    assert field_docs(doc) == {"alpha": "the first, continued here",
                               "beta_2": "the second (paper: 0.1)"}
    for cls in (FactorArgs, ScoreArgs, SketchArgs, IndexArgs):   # every flag has its help
        assert set(field_docs(cls.__doc__)) == {f.name for f in dataclasses.fields(cls)}


def test_a_config_value_converts_through_the_flag_declaration():
    layers = Option("layers", nargs="+")
    assert layers.convert("mlp", "k") == ["mlp"] and layers.convert(["a", "b"], "k") == ["a", "b"]
    assert Option("n", type=int, choices=(1, 2)).convert(2, "k") == 2
    with pytest.raises(ValueError, match="k = 3 must be one of 1, 2"):
        Option("n", type=int, choices=(1, 2)).convert(3, "k")
    with pytest.raises(ValueError, match="k = 'x' must be true or false"):
        Option("on", switch=True).convert("x", "k")


@pytest.mark.parametrize("verb", [v.name for v in VERBS] + ["validate tail-patch",
                                                              "validate lds"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*verb.split(), "--help"])
    assert exit.value.code == 0 and f"usage: influence-nb {verb}" in capsys.readouterr().out

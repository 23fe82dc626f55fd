"""Bad arguments are refused where they are passed, in one line that names the argument, its
value and what is allowed (influence_nb.checks), never as a silently wrong result."""
import copy
import hashlib
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import zlib
from collections.abc import Sequence

import numpy as np
import pytest
import safetensors.torch
import torch

from influence_nb import store
from influence_nb.curvature import FactorArgs, Factors, fit_factors
from influence_nb.data import Corpus, CorpusError
from influence_nb.index import IndexArgs, IndexFileError
from influence_nb.results import InfluenceResult
from influence_nb.retriever import Retriever
from influence_nb.scoring import ScoreArgs, scan
from influence_nb.session import Influence
from influence_nb.sketch import SketchArgs, SketchError, Sketches, build_sketches
from influence_nb.training import Retrainer, TrainConfig
from influence_nb.validate import lds, leave_out, pbrf, tail_patch, top_ids
from test_scoring import TEXTS, tiny_model


@pytest.mark.parametrize("make, error, message", [
    (lambda: ScoreArgs(rank=0), ValueError, "ScoreArgs(rank=0): must be an integer ≥ 1 or None"),
    (lambda: ScoreArgs(rank=-3), ValueError, "rank=-3"),
    (lambda: ScoreArgs(batch_size=0), ValueError, "batch_size=0"),
    (lambda: ScoreArgs(chunk_size=2.0), TypeError, "chunk_size=2.0"),
    (lambda: ScoreArgs(progress="no"), TypeError, "must be a bool"),
    (lambda: FactorArgs(damping=float("nan")), ValueError, "finite number > 0 or None"),
    (lambda: FactorArgs(damping=-1e-3), ValueError, "damping=-0.001"),
    (lambda: FactorArgs(damping_factor=0), ValueError, "damping_factor=0"),
    (lambda: FactorArgs(strategy="ekafc"), ValueError, "one of 'ekfac', 'kfac', 'identity'"),
    (lambda: FactorArgs(batch_size=True), TypeError, "batch_size=True"),
    (lambda: FactorArgs(max_examples=0), ValueError, "max_examples=0"),
    (lambda: SketchArgs(m=0), ValueError, "SketchArgs(m=0)"),
    (lambda: SketchArgs(variant="plain"), ValueError, "'auto', 'eigen', 'whitened'"),
    (lambda: IndexArgs(kind="ivf"), ValueError, "IndexArgs(kind='ivf')"),
    (lambda: IndexArgs(nprobe=0), ValueError, "nprobe=0"),
])
def test_argument_dataclasses_refuse_bad_values_in_one_line(make, error, message):
    with pytest.raises(error) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_values_pass():
    FactorArgs(damping=1e-3, layers=["h.0.mlp.c_fc"], max_examples=None)
    ScoreArgs(rank=None)
    IndexArgs(nlist=None, pq_m=None, shard_size=None)


def test_metadata_of_another_length_is_refused(tokenizer):
    with pytest.raises(CorpusError, match="3 texts but 2 metadata dicts"):
        Corpus.from_texts(["a b", "c d", "e f"], tokenizer, 32, metadata=[{}, {}])


# -- corpus reading: file and line named, collisions refused ---------------------------------

def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize("name, data, message", [
    ("c.jsonl", '{"text": "a b"}\n[1, 2]\n', "c.jsonl:2 is a JSON list, not an object"),
    ("c.jsonl", '{"text": "a b"}\n{"text": \n', "c.jsonl:2 is not valid JSON"),
    ("c.txt", b"one\ntwo\nthr\xffee\n", "c.txt:3 is not UTF-8 (byte 0xff at column 4)"),
    ("c.jsonl", '{"text": "a b", "doc": 3}\n', "metadata field 'doc'"),
    ("c.jsonl", '{"text": "a b", "id": 1, "source_id": 2}\n', "metadata field 'source_id'"),
    ("c.jsonl", '{"text": "a b", "n_tokens": 9}\n', "metadata field 'n_tokens'"),
    ("c.jsonl", '{"body": "a b"}\n', "has no field 'text' (fields: body); pass text_field"),
    ("c.parquet", b"PAR1 this is not parquet", "is not a readable parquet file"),
])
def test_corpus_files_fail_in_one_line_naming_file_and_line(tmp_path, tokenizer, name, data,
                                                           message):
    with pytest.raises(CorpusError) as e:
        Corpus.from_file(_write(tmp_path / name, data), tokenizer, 32)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("max_len, error", [(12.5, TypeError), ("64", TypeError),
                                            (True, TypeError), (1, ValueError)])
def test_max_len_must_be_an_integer_of_at_least_2(tokenizer, max_len, error):
    with pytest.raises(error, match=re.escape(f"Corpus.from_texts(max_len={max_len!r}): must be "
                                              "an integer ≥ 2")):
        Corpus.from_texts(["a b c"], tokenizer, max_len)


def test_records_that_are_not_objects_are_refused(tokenizer):
    with pytest.raises(CorpusError, match="holds a str, not an object of fields"):
        Corpus.from_records(["a b c"], tokenizer, 32)


# -- models meeting data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tokenizer):
    """A tiny float64 GPT-NeoX, a corpus and its EK-FAC factors."""
    model = tiny_model(len(tokenizer))
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    return model, corpus, fit_factors(model, corpus, FactorArgs(batch_size=6, progress=False))


def test_ids_counts_and_queries_of_the_wrong_kind_are_refused(small, tokenizer):
    """A float is never truncated, a negative id never wrapped, a count never below 1, a string
    never unpacked into a (prompt, completion) pair: one line each."""
    model, corpus, factors = small
    inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(progress=False))
    res = inf.scan([("alpha number", " 0 is even."), ("theta", " number 7")], ids=[0, 1, 2])
    cases = [
        (lambda: res.top(0, k=-3), ValueError, r"InfluenceResult.top\(k=-3\): must be an integer ≥ 1"),
        (lambda: res.top(0, k=0), ValueError, r"top\(k=0\): must be an integer ≥ 1"),
        (lambda: res.top(0, k=2.0), TypeError, r"top\(k=2.0\): must be an integer ≥ 1"),
        (lambda: res.top(1.0), TypeError, r"top\(q=1.0\): must be an integer"),
        (lambda: res.top(2), IndexError, "must be an integer from -2 to 1, got 2"),
        (lambda: res.tokens(0, 1.5), TypeError, r"tokens\(id=1.5\): must be an integer"),
        (lambda: res.tokens(0, True), TypeError, r"tokens\(id=True\): must be an integer"),
        (lambda: res.tokens(0, len(corpus)), IndexError, f"from 0 to {len(corpus) - 1}"),
        (lambda: res.layer_profile(0, k=-1), ValueError, r"layer_profile\(k=-1\): must be an integer ≥ 1 or None"),
        (lambda: corpus.subset([-1]), IndexError, "id -1 is out of range"),
        (lambda: corpus.subset([0.5]), TypeError, r"subset\(ids=\[0.5\]\): must be a sequence of integers"),
        (lambda: inf.scan(["ab"]), TypeError, "query 0 is 'ab', not a .prompt, completion. pair"),
        (lambda: inf.scan([("a", " b"), ("c",)]), TypeError, r"query 1 is \('c',\)"),
        (lambda: inf.scan([]), ValueError, "no queries: pass a .prompt, completion. pair"),
        (lambda: inf.scan("ab"), ValueError, "no queries"),
        (lambda: inf.scan(("alpha", 3)), TypeError, r"query 0 is \('alpha', 3\)"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert len(res.top(0, k=np.int64(2))) == 2 and len(res.top(-1, k=1)) == 1   # still fine


def test_token_ids_beyond_the_vocabulary_are_refused(small, tokenizer):
    corpus = small[1]
    vocab = int(corpus.tokens.max())               # a model one token short of the corpus
    model = tiny_model(vocab)
    with pytest.raises(ValueError, match=f"token id {vocab}, beyond the model's vocabulary of "
                                         f"{vocab}; tokenize the corpus with the model's own"):
        fit_factors(model, corpus, FactorArgs(progress=False))


def test_a_corpus_with_nothing_to_score_is_refused(small, tokenizer):
    one_token = Corpus.from_texts(["a", "b", "c"], tokenizer, 2)
    assert (np.diff(one_token.offsets) == 1).all()
    with pytest.raises(ValueError, match="none of the 3 sequences has a token to score"):
        fit_factors(small[0], one_token, FactorArgs(progress=False))


def test_score_texts_keeps_one_sequence_per_text(small, tokenizer):
    model, corpus, factors = small
    inf = Influence(model, tokenizer, Corpus.from_texts(TEXTS, tokenizer, max_len=8), factors,
                    ScoreArgs(rank=None, progress=False))
    long = " ".join(TEXTS[:3])                      # longer than the session corpus's max_len
    res = inf.score_texts([TEXTS[0], long], ("alpha number", " 0 is even."))
    assert list(res.ids) == [0, 1] and res.scores.shape == (1, 2)
    alone = inf.score_texts([long], ("alpha number", " 0 is even."))
    np.testing.assert_allclose(alone.scores[0, 0], res.scores[0, 1], rtol=1e-9)
    with pytest.raises(ValueError, match="text 1 has .* tokens, more than the model's context "
                                         "of 64; shorten it"):
        inf.score_texts([TEXTS[0], " ".join(TEXTS)], ("alpha number", " 0 is even."))
    with pytest.raises(ValueError, match="text 0 is empty"):
        inf.score_texts(["  "], ("alpha number", " 0 is even."))


def _other_embedding(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.gpt_neox.embed_in.weight[5, 0] += 0.25   # an untracked weight
    return other


def test_factors_never_pair_with_a_model_whose_untracked_weights_differ(small, tokenizer,
                                                                        tmp_path):
    model, corpus, factors = small
    other = _other_embedding(model)
    with pytest.raises(ValueError, match="the factors were fitted on another model"):
        Influence(other, tokenizer, corpus, factors)
    factors.save(tmp_path)
    with pytest.raises(ValueError, match="fitted for a different model"):
        Factors.load(tmp_path, other)
    Factors.load(tmp_path, model)


def test_a_scan_folder_refuses_another_model(small, tokenizer, tmp_path):
    model, corpus, factors = small
    args = ScoreArgs(rank=None, chunk_size=12, batch_size=6, progress=False)
    Influence(model, tokenizer, corpus, factors, args).scan(("alpha number", " 0 is"),
                                                            out_dir=tmp_path)
    other = _other_embedding(model)
    q = Influence(model, tokenizer, corpus, factors, args).queries(("alpha number", " 0 is"))
    with pytest.raises(ValueError, match="holds a scan of other model"):
        scan(other, q, corpus, args, tmp_path)


# -- artifacts: every manifest, file name, checksum and shape checked ---------------------------

def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _forge(path, **changes):
    """Rewrite a factors manifest with ``changes`` (None deletes a key), sealed again: a forger
    who recomputes the seal still meets every check behind it."""
    m = _manifest(path) | changes
    store.write_manifest(path / "manifest.json", {k: v for k, v in m.items() if v is not None})


def _drop_lambda(path):
    m = _manifest(path)
    tensors = safetensors.torch.load((path / m["tensors"]).read_bytes())
    blob = safetensors.torch.save({k: v for k, v in tensors.items() if not k.endswith("Lambda")})
    (path / m["tensors"]).write_bytes(blob)
    _forge(path, sha256=hashlib.sha256(blob).hexdigest())


@pytest.mark.parametrize("damage, error, message", [
    (lambda p: (p / _manifest(p)["tensors"]).write_bytes(b""), ValueError,
     "fails the manifest's SHA-256"),
    (lambda p: (p / _manifest(p)["tensors"]).write_bytes(
        (p / _manifest(p)["tensors"]).read_bytes()[:-100]), ValueError, "corrupt or incomplete"),
    (lambda p: _forge(p, sha256=None), ValueError, "lacks sha256"),
    (lambda p: (p / "manifest.json").write_text("[1, 2]"), ValueError,
     "corrupt or not a manifest"),
    (lambda p: _forge(p, tensors="../../etc/passwd"), ValueError, "not a file in that folder"),
    (lambda p: _forge(p, tensors=["x"]), ValueError, "not a file in that folder"),
    (_drop_lambda, ValueError, "lack tensor '.*/Lambda' of a strategy='ekfac' fit"),
    (lambda p: (p / "manifest.json").unlink(), FileNotFoundError, "no fitted factors"),
])
def test_damaged_factors_are_refused_in_one_line(small, tmp_path, damage, error, message):
    small[2].save(tmp_path)
    damage(tmp_path)
    with pytest.raises(error) as e:
        Factors.load(tmp_path)
    assert re.search(message, str(e.value)) and "\n" not in str(e.value)


def test_damaged_scan_chunks_and_results_are_refused(small, tokenizer, tmp_path):
    model, corpus, factors = small
    args = ScoreArgs(rank=None, chunk_size=12, batch_size=6, progress=False)
    inf = Influence(model, tokenizer, corpus, factors, args)
    pair = ("alpha number", " 0 is")
    res = inf.scan(pair, out_dir=tmp_path / "scan")
    chunk = tmp_path / "scan" / "chunk_0000000012.npz"
    good = chunk.read_bytes()
    chunk.write_bytes(good[:len(good) // 2])                              # truncated
    with pytest.raises(ValueError, match="chunk_0000000012.npz is unreadable"):
        inf.scan(pair, out_dir=tmp_path / "scan")
    ids = np.arange(12, 24)                                   # forged: valid CRC and run id
    run = json.loads((tmp_path / "scan" / "manifest.json").read_text())["run"]
    buf = io.BytesIO()
    arrays = dict(layer_scores=np.zeros((1, 1, 12)), ids=ids, run=np.array(run))
    crc = 0
    for k in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[k]), crc)
    np.savez(buf, crc32=np.int64(crc), **arrays)
    chunk.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"holds no layer_scores of shape \(1, 4, 12\)"):
        inf.scan(pair, out_dir=tmp_path / "scan")

    res.save(tmp_path / "res")
    other = inf.scan(("beta number", " 1 is"))
    other.save(tmp_path / "other")
    (tmp_path / "other" / "result.npz").replace(tmp_path / "res" / "result.npz")
    with pytest.raises(ValueError, match="fails the manifest's SHA-256"):
        InfluenceResult.load(tmp_path / "res")


@pytest.fixture(scope="module")
def sketched(small, tokenizer, tmp_path_factory):
    model, corpus, factors = small
    inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(progress=False))
    root = tmp_path_factory.mktemp("sketched")
    inf.retriever(root, SketchArgs(m=16, chunk_size=12, batch_size=6, progress=False),
                  IndexArgs(progress=False))
    return inf, root


def test_damaged_sketches_and_index_are_refused(sketched, tmp_path):
    inf, root = sketched
    shutil.copytree(root, tmp_path / "r")
    index = json.loads((tmp_path / "r/index/index.json").read_text())
    index["shards"][0]["file"] = "../sketches/sketches.f16"
    store.write_manifest(tmp_path / "r/index/index.json", index)
    with pytest.raises(IndexFileError, match="not a file in that folder"):
        Retriever.open(inf, tmp_path / "r")
    manifest = json.loads((tmp_path / "r/sketches/sketches.json").read_text())
    del manifest["chunks"]
    store.write_manifest(tmp_path / "r/sketches/sketches.json", manifest)
    with pytest.raises(SketchError, match="lacks chunks"):
        Retriever.open(inf, tmp_path / "r")

    shutil.rmtree(tmp_path / "r")
    shutil.copytree(root, tmp_path / "r")
    data = bytearray((tmp_path / "r/sketches/sketches.f16").read_bytes())
    data[10] ^= 0x10
    (tmp_path / "r/sketches/sketches.f16").write_bytes(bytes(data))
    for open_it in (lambda: Retriever.open(inf, tmp_path / "r"),
                    lambda: inf.retriever(tmp_path / "r")):      # a build verifies what it resumes
        with pytest.raises(SketchError, match="is corrupt .*fails its CRC-32"):
            open_it()


LOCK_HOLDER = """
import sys, time
from influence_nb import store
with store.lock(sys.argv[1], ValueError):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_store_being_written_refuses_a_second_writer_until_the_first_dies(small, tokenizer,
                                                                            tmp_path):
    """Two writers never interleave: while another process holds the store's lock a build
    stops at once with a one-line error naming that process; once it is killed (its lock
    died with it) the build runs, and the store verifies."""
    model, corpus, factors = small
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "s")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = SketchArgs(m=16, chunk_size=12, batch_size=6, progress=False)
        with pytest.raises(SketchError, match=f"is being written by process {holder.pid} on "):
            build_sketches(model, factors, corpus, tmp_path / "s", args)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    sketches = build_sketches(model, factors, corpus, tmp_path / "s", args)
    assert len(Sketches.open(tmp_path / "s", model, factors)) == len(corpus) == len(sketches)


# -- the command line: exit 2, one line on stderr, never a traceback ---------------------------

@pytest.fixture(scope="module")
def cli_job(tmp_path_factory):
    """The micro world as a model directory and corpus file, its factors, sketches, a queries
    file and a few broken inputs, written once."""
    from influence_nb import demo
    from influence_nb.cli import main
    root = tmp_path_factory.mktemp("cli_bad")
    world = demo.world_path("micro")
    common = ["--model", str(world), "--corpus", str(world / "corpus.parquet"), "--no-progress"]
    main(["fit", *common, "--out", str(root / "factors"), "--batch-size", "32",
          "--max-examples", "64"])
    main(["sketch", *common, "--factors", str(root / "factors"), "--out", str(root / "search"),
          "--m", "16", "--limit", "64", "--chunk-size", "32", "--batch-size", "32"])
    (root / "q.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    (root / "bad_q.jsonl").write_text('{"prompt": "a", "completion": " b"}\n{"prompt": 3}\n')
    (root / "notjson_q.jsonl").write_text('{"prompt": "a",\n')
    _write(root / "latin1.txt", b"caf\xe9 au lait\n")
    _write(root / "list.jsonl", '[1, 2]\n')
    (root / "no_tokenizer").mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(world / f, root / "no_tokenizer" / f)
    (root / "broken_model").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(world / f, root / "broken_model" / f)
    _write(root / "broken_model" / "model.safetensors", b"\x00" * 64)
    tomls = {"type": 'batch_size = "four"\n', "range": "[fit]\nbatch_size = 0\n",
             "bool": "progress = 3\n", "choice": '[fit]\nstrategy = "ekafc"\n',
             "syntax": "batch_size = = 3\n", "unknown": "[fit]\nbatchsize = 3\n",
             "nan": "[fit]\ndamping = nan\n", "list": "[score]\nquery = [\"a\", \"b\"]\n",
             "dtype": '[fit]\ndtype = "float8"\n', "layers": "[fit]\nlayers = [1, 2]\n"}
    for name, text in tomls.items():
        (root / f"{name}.toml").write_text(text)
    return root, world, common


def _cases():
    """(subcommand, argv builder, expected text) — every subcommand, missing, invalid and
    out-of-range arguments, bad files and bad TOML."""
    fit = lambda r, w, c: ["fit", *c, "--out", str(r / "out_fit")]                # noqa: E731
    fac = lambda r, w, c: ["--factors", str(r / "factors")]                        # noqa: E731
    q = ["--query", "a", " b"]
    score = lambda r, w, c: ["score", *c, *fac(r, w, c), "--out", str(r / "out_s")]  # noqa
    search = lambda r, w, c: ["search", *c, *fac(r, w, c), "--index", str(r / "search"),
                              "--out", str(r / "out_q")]                          # noqa: E731
    sketch = lambda r, w, c: ["sketch", *c, *fac(r, w, c), "--out", str(r / "out_k")]  # noqa
    tail = lambda r, w, c: ["validate", "tail-patch", *c, *fac(r, w, c),
                            "--out", str(r / "out_t")]                            # noqa: E731
    return [
        # fit
        ("fit", lambda r, w, c: ["fit", *c], "fit needs --out"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--batch-size", "0"],
         "FactorArgs(batch_size=0): must be an integer ≥ 1"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--batch-size", "x"], "invalid int value"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--damping", "nan"], "finite number > 0"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--strategy", "ekafc"], "one of 'ekfac'"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--layers", "nope.*"],
         "layer 'nope.*' is not a preset"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--device", "cuda"], "no CUDA device"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--device", "gpu9"], "is not a torch device"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--max-len", "0"], "must be a finite number above 0"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--dtype", "float8"], "invalid choice"),
        ("fit", lambda r, w, c: ["fit", "--model", str(r / "no_tokenizer"), "--corpus",
                                 str(w / "corpus.parquet"), "--out", str(r / "o")],
         "has no tokenizer files"),
        ("fit", lambda r, w, c: ["fit", "--model", str(r / "broken_model"), "--corpus",
                                 str(w / "corpus.parquet"), "--out", str(r / "o")],
         "the model does not load"),
        ("fit", lambda r, w, c: ["fit", "--model", str(r / "nothing"), "--corpus",
                                 str(w / "corpus.parquet"), "--out", str(r / "o")],
         "not a Hugging Face model directory"),
        ("fit", lambda r, w, c: ["fit", "--model", str(w), "--corpus", str(r / "latin1.txt"),
                                 "--out", str(r / "o")], "latin1.txt:1 is not UTF-8"),
        ("fit", lambda r, w, c: ["fit", "--model", str(w), "--corpus", str(r / "list.jsonl"),
                                 "--out", str(r / "o")], "list.jsonl:1 is a JSON list"),
        ("fit", lambda r, w, c: ["fit", "--model", str(w), "--corpus", str(r / "none.jsonl"),
                                 "--out", str(r / "o")], "corpus file not found"),
        ("fit", lambda r, w, c: ["fit", "--model", str(w), "--corpus", str(r), "--out",
                                 str(r / "o")], "not a saved datasets.Dataset"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "type.toml")],
         "batch_size = 'four' is not valid for --batch-size"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "range.toml")],
         "FactorArgs(batch_size=0)"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "bool.toml")],
         "progress = 3 must be true or false"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "choice.toml")],
         "one of 'ekfac'"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "syntax.toml")],
         "is not valid TOML"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "unknown.toml")],
         "unknown option 'batchsize'"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "nan.toml")],
         "finite number > 0"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "dtype.toml")],
         "must be one of auto, float32"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "layers.toml")],
         "must be a string or a list of strings"),
        ("fit", lambda r, w, c: [*fit(r, w, c), "--config", str(r / "absent.toml")],
         "not found"),
        # sketch
        ("sketch", lambda r, w, c: ["sketch", *c, "--out", str(r / "k")], "sketch needs --factors"),
        ("sketch", lambda r, w, c: [*sketch(r, w, c), "--m", "0"], "SketchArgs(m=0)"),
        ("sketch", lambda r, w, c: [*sketch(r, w, c), "--limit", "0"], "--limit: 0 must be"),
        ("sketch", lambda r, w, c: [*sketch(r, w, c), "--chunk-size", "33", "--batch-size", "8",
                                    "--limit", "40"], "must be a multiple of batch_size"),
        ("sketch", lambda r, w, c: [*sketch(r, w, c), "--limit", "40", "--index-kind", "ivfpq"],
         "needs at least 256 training rows, but there are 40"),
        ("sketch", lambda r, w, c: [*sketch(r, w, c), "--index-nprobe", "-1"],
         "IndexArgs(nprobe=-1)"),
        ("sketch", lambda r, w, c: ["sketch", *c, "--factors", str(r / "none"), "--out",
                                    str(r / "k")], "no fitted factors"),
        # score
        ("score", lambda r, w, c: score(r, w, c), "no queries"),
        ("score", lambda r, w, c: [*score(r, w, c), *q, "--rank", "0"], "ScoreArgs(rank=0)"),
        ("score", lambda r, w, c: [*score(r, w, c), *q, "--top", "-2"], "--top: -2 must be"),
        ("score", lambda r, w, c: [*score(r, w, c), "--query", "a"], "expected 2 arguments"),
        ("score", lambda r, w, c: [*score(r, w, c), "--queries", str(r / "bad_q.jsonl")],
         "bad_q.jsonl:2 must be an object with the text fields prompt and completion"),
        ("score", lambda r, w, c: [*score(r, w, c), "--queries", str(r / "notjson_q.jsonl")],
         "notjson_q.jsonl:1 is not valid JSON"),
        ("score", lambda r, w, c: [*score(r, w, c), *q, "--strategy", "lissa"], "invalid choice"),
        ("score", lambda r, w, c: [*score(r, w, c), "--query", "a", ""], "empty completion"),
        ("score", lambda r, w, c: [*score(r, w, c), *q, "--config", str(r / "list.toml")],
         "must be a list of [prompt, completion] string pairs"),
        # search
        ("search", lambda r, w, c: [*search(r, w, c), *q, "--candidates", "0"],
         "--candidates: 0 must be"),
        ("search", lambda r, w, c: [*search(r, w, c), *q, "--lexical", "2"],
         "--lexical: 2 must be a number from 0 to 1"),
        ("search", lambda r, w, c: [*search(r, w, c), *q, "--recall", "1"],
         "--recall: 1 must be a number strictly between 0 and 1"),
        ("search", lambda r, w, c: [*search(r, w, c), *q, "--recall", "0.9", "--candidates",
                                    "10"], "search(candidates=10, recall=0.9): give one"),
        ("search", lambda r, w, c: ["search", *c, *fac(r, w, c), *q, "--index",
                                    str(r / "none"), "--out", str(r / "o")], "is missing"),
        ("search", lambda r, w, c: [*search(r, w, c), *q, "--ef-search", "0"],
         "--ef-search: 0 must be"),
        # validate
        ("validate", lambda r, w, c: ["validate"], "the following arguments are required"),
        ("validate", lambda r, w, c: ["validate", "lds", "--world", "nowhere", "--out", "x"],
         "invalid choice"),
        ("validate", lambda r, w, c: ["validate", "lds", "--alpha", "1.5", "--out", "x"],
         "--alpha: 1.5 must be a number strictly between 0 and 1"),
        ("validate", lambda r, w, c: [*tail(r, w, c), *q, "--k", "0"], "--k: 0 must be"),
        ("validate", lambda r, w, c: [*tail(r, w, c), *q, "--lr", "inf"], "--lr: inf must be"),
        ("validate", lambda r, w, c: tail(r, w, c), "no queries"),
        # demo
        ("demo", lambda r, w, c: ["demo", "--facts", "999"], "the demo world has facts 0 …"),
        ("demo", lambda r, w, c: ["demo", "--batch-size", "0"], "--batch-size: 0 must be"),
        ("demo", lambda r, w, c: ["demo", "--facts", "one"], "invalid int value"),
        # no subcommand at all
        (None, lambda r, w, c: [], "the following arguments are required: command"),
        (None, lambda r, w, c: ["fitt"], "invalid choice: 'fitt'"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{c[0]}-{c[2][:28]}" for c in CASES])
def test_every_cli_failure_is_exit_2_and_one_line(cli_job, capsys, case):
    from influence_nb.cli import main
    command, build, message = CASES[case]
    argv = build(*cli_job)
    if command not in (None, "demo") and len(argv) > 2 and "--no-progress" not in argv:
        argv.append("--no-progress")     # a progress bar started before the failure is not it
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err


@pytest.mark.slow
def test_the_installed_command_never_prints_a_traceback(cli_job):
    """The console script itself, in a fresh process: a library failure deep in the model
    load is one line, and a non-finite model is refused in one line too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root, world, common = cli_job
    model = AutoModelForCausalLM.from_pretrained(world)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layernorm" in n)[0] = float("nan")
    model.save_pretrained(root / "nan_model")
    AutoTokenizer.from_pretrained(world).save_pretrained(root / "nan_model")
    corpus = ["--corpus", str(world / "corpus.parquet"), "--out", str(root / "o"),
              "--no-progress", "--max-examples", "8"]
    for argv, message in [
            (["fit", "--model", str(root / "broken_model"), *corpus], "the model does not load"),
            (["fit", "--model", str(root / "nan_model"), *corpus], "non-finite")]:
        run = subprocess.run([sys.executable, "-m", "influence_nb.cli", *argv],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-1500:]
        assert len(run.stderr.strip().splitlines()) == 1 and message in run.stderr, run.stderr


def test_a_zero_fisher_is_refused_instead_of_dividing_by_zero(small):
    from dataclasses import replace
    factors = copy.deepcopy(small[2])
    name = factors.layer_names[0]
    factors.layers[name].Lambda.zero_()
    zero = replace(factors, args=replace(factors.args, damping_factor=0.2))  # no cached λ
    V = torch.ones(factors.shapes[name], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"the Fisher of layer '{name}' has mean eigenvalue 0"):
        zero.precondition_layer(name, V)
    absolute = replace(factors, args=replace(factors.args, damping=1e-3))
    assert torch.isfinite(absolute.precondition_layer(name, V)).all()


def test_one_module_name_or_glob_selects_layers(small):
    from influence_nb.layers import find_layers
    model = small[0]
    one = find_layers(model, "gpt_neox.layers.1.mlp.dense_4h_to_h")
    assert [t.name for t in one] == ["gpt_neox.layers.1.mlp.dense_4h_to_h"]
    assert [t.name for t in find_layers(model, "*.dense_h_to_4h")] == [
        "gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.1.mlp.dense_h_to_4h"]
    assert FactorArgs(layers="*.dense_h_to_4h").layers == "*.dense_h_to_4h"


# -- one declared mechanism at every door (influence_nb.checks.checked) ------------------------

def test_one_rule_for_dataclass_fields_and_function_arguments():
    """check_args and @checked read the same annotations and declarations through one Rule:
    the same value fails in the same words, whether a field or an argument."""
    from influence_nb.checks import checked, rules

    @checked(minimum={"k": 1, "lam": 0.0}, within={"share": "(0, 1]"},
             choices={"sign": ("positive", "negative")}, distinct=("seeds",),
             nonempty=("seeds",))
    def door(k: int, lam: float = 1.0, share: float | None = None, sign: str = "positive",
             seeds: Sequence[int] = (0,), on: bool = True, *rest, label: str = "x") -> int:
        return k

    assert door(3, np.float32(0.5), share=1, seeds=np.arange(3), label="y") == 3
    cases = [((0,), {}, ValueError, "door(k=0): must be an integer ≥ 1"),
             ((True,), {}, TypeError, "door(k=True): must be an integer ≥ 1"),
             ((2.0,), {}, TypeError, "door(k=2.0)"),
             ((10 ** 30,), dict(lam=10 ** 400), ValueError, "door(lam=1000"),
             ((1, float("nan")), {}, ValueError, "door(lam=nan): must be a finite number > 0"),
             ((1,), dict(share=0.0), ValueError, "must be a finite number in (0, 1] or None"),
             ((1,), dict(sign="abs"), ValueError, "one of 'positive', 'negative'"),
             ((1,), dict(seeds=(0, 0)), ValueError, "a sequence of integers, each once, not "
                                                    "empty"),
             ((1,), dict(seeds=()), ValueError, "door(seeds=())"),
             ((1,), dict(seeds=[0.5]), TypeError, "door(seeds=[0.5])"),
             ((1,), dict(seeds="01"), TypeError, "door(seeds='01')"),
             ((1,), dict(on="yes"), TypeError, "door(on='yes'): must be a bool"),
             ((1,), dict(label=3), TypeError, "door(label=3): must be a str")]
    for args, kw, error, message in cases:
        with pytest.raises(error) as e:
            door(*args, **kw)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    long = np.arange(10 ** 5) * 0.5                  # an array's repr is cut and kept on one line
    with pytest.raises(TypeError) as e:
        door(1, seeds=long.reshape(-1, 2))
    assert "\n" not in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(TypeError, match=r"declared rules for \['kk'\]"):
        rules({"k": "int"}, minimum={"kk": 1})        # a typo in a declaration fails at import
    assert set(door.rules) == {"k", "lam", "share", "sign", "seeds", "on", "label"}


@pytest.mark.parametrize("call, error, message", [
    (lambda s: TrainConfig(epochs=-1), ValueError, "TrainConfig(epochs=-1): must be an integer ≥ 1"),
    (lambda s: TrainConfig(lr=float("nan")), ValueError, "TrainConfig(lr=nan)"),
    (lambda s: TrainConfig(warmup_steps=0), ValueError, "TrainConfig(warmup_steps=0)"),
    (lambda s: TrainConfig(label_smoothing=1.0), ValueError, "in [0, 1)"),
    (lambda s: lds(_retrain, [[1]], [[2]], {"a": np.zeros((1, 4))}, seeds=(0, 0)), ValueError,
     "lds(seeds=(0, 0)): must be a sequence of integers each ≥ 0, each once"),
    (lambda s: lds(_retrain, [[1]], [[2]], {"a": np.zeros((1, 4))}, alpha=1.0), ValueError,
     "lds(alpha=1.0): must be a finite number in (0, 1)"),
    (lambda s: lds(None, [[1]], [[2]], {"a": np.zeros((1, 4))}), TypeError,
     "lds(retrain=None): must be a Callable"),
    (lambda s: leave_out(_retrain, [[1]], [[2]], {"a": np.zeros((1, 4), int)}, 4, ks=(-1,)),
     ValueError, "leave_out(ks=(-1,)): must be a sequence of integers each ≥ 1"),
    (lambda s: leave_out(_retrain, [[1]], [[2]], {"a": -np.ones((1, 4), int)}, 4, ks=(2,)),
     IndexError, "id -1 is out of range for a corpus of 4 sequences (in rankings['a'])"),
    (lambda s: tail_patch(s[0], s[1], [[1]], [[2]], {"a": [[0]]}, lr=float("nan")), ValueError,
     "tail_patch(lr=nan): must be a finite number > 0"),
    (lambda s: tail_patch(s[0], s[1], [[1]], [[2]], {}), ValueError, "no candidates"),
    (lambda s: tail_patch(s[0], TEXTS, [[1]], [[2]], {}), TypeError,
     "tail_patch(corpus=['alpha"),
    (lambda s: pbrf(s[0], None, [[1]], [[2]], [0], eps=0), ValueError,
     "pbrf(eps=0): must be a finite number > 0 or None"),
    (lambda s: top_ids(np.zeros((1, 3)), k=0), ValueError, "top_ids(k=0)"),
])
def test_validation_and_training_doors_refuse_in_one_line(small, call, error, message):
    with pytest.raises(error) as e:
        call(small)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def _retrain(ids, seed=0):
    return None


def test_a_retrainer_refuses_a_negative_id_instead_of_wrapping_it(small, tokenizer):
    model, corpus, _ = small
    retrain = Retrainer(lambda seed: tiny_model(len(tokenizer)), corpus, TrainConfig(epochs=1))
    with pytest.raises(IndexError, match="id -1 is out of range"):
        retrain([0, -1])
    with pytest.raises(ValueError, match=r"Retrainer.__call__\(seed=-1\)"):
        retrain([0], seed=-1)
